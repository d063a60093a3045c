"""Tests of objectives.py against independent references: the formulas written out again in float64, and the
properties each objective is chosen for (zero where it should be, a gradient where it must have one and none
where it must not)."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from objectives import (
    distillation_loss,
    dpo_loss,
    group_advantages,
    kl_k3,
    policy_gradient_loss,
    sequence_logprobs,
    token_logprobs,
)

assert_close = torch.testing.assert_close


def _targets(B, T, V, seed, off=((0, 0), (1, 2), (1, 3))):
    """Random targets (B, T) with -100 at the positions in `off`."""
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    for b, t in off:
        targets[b, t] = -100
    return targets


def _randn(*shape, seed, dtype=torch.float64, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# token_logprobs, sequence_logprobs


def test_token_logprobs_match_float64_log_softmax_and_are_zero_off_target():
    logits, targets = _randn(2, 5, 7, seed=0, dtype=torch.float32), _targets(2, 5, 7, seed=1)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    for b in range(2):
        for t in range(5):
            if targets[b, t] != -100:
                expected[b, t] = torch.log_softmax(logits[b, t].double(), -1)[targets[b, t]]
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32
    assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert (got[targets == -100] == 0).all()
    assert token_logprobs(logits.bfloat16(), targets).dtype == torch.float32  # bf16 is raised, not kept
    assert_close(sequence_logprobs(logits, targets).double(), expected.sum(-1), rtol=0, atol=1e-5)


# distillation_loss


def test_distillation_kl_and_its_gradient_are_zero_when_student_equals_teacher():
    student = _randn(2, 4, 6, seed=2, dtype=torch.float32).requires_grad_()
    loss, parts = distillation_loss(student, student.detach().clone(), _targets(2, 4, 6, seed=3), 0.0, 2.0)
    assert parts["kl"] == 0 and loss == 0
    (grad,) = torch.autograd.grad(loss, student)
    assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-7)


def test_distillation_with_alpha_one_is_cross_entropy():
    student, teacher, targets = _randn(2, 4, 6, seed=4), _randn(2, 4, 6, seed=5), _targets(2, 4, 6, seed=6)
    loss, parts = distillation_loss(student, teacher, targets, 1.0, 3.0)
    expected = F.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert_close(loss, expected, rtol=0, atol=1e-12)
    assert_close(parts["ce"], expected, rtol=0, atol=1e-12)


def test_distillation_matches_float64_reference():
    student, teacher, targets = _randn(2, 4, 6, seed=7), _randn(2, 4, 6, seed=8), _targets(2, 4, 6, seed=9)
    alpha, T = 0.3, 2.0
    ce, kl, n = 0.0, 0.0, 0
    for b in range(2):
        for t in range(4):
            if targets[b, t] == -100:
                continue
            n += 1
            ce -= torch.softmax(student[b, t], -1)[targets[b, t]].log().item()
            p, q = torch.softmax(teacher[b, t] / T, -1), torch.softmax(student[b, t] / T, -1)
            kl += (p * (p.log() - q.log())).sum().item()
    loss, parts = distillation_loss(student, teacher, targets, alpha, T)
    assert_close(parts["ce"].item(), ce / n, rtol=1e-12, atol=0)
    assert_close(parts["kl"].item(), kl / n, rtol=1e-10, atol=0)
    assert_close(loss.item(), alpha * ce / n + (1 - alpha) * T**2 * kl / n, rtol=1e-10, atol=0)


def test_distillation_temperature_squared_keeps_the_gradient_size():
    # For logits of small spread the soft term's gradient is ~ (z_s - z_t) / (V T^2); the T^2 factor cancels it.
    student, teacher, targets = _randn(3, 4, 8, seed=10, scale=0.1), _randn(3, 4, 8, seed=11, scale=0.1), \
        _targets(3, 4, 8, seed=12)
    norms = {}
    for T in (1.0, 4.0):
        s = student.clone().requires_grad_()
        loss, _ = distillation_loss(s, teacher, targets, 0.0, T)
        norms[T] = torch.autograd.grad(loss, s)[0].norm().item()
    ratio = norms[4.0] / norms[1.0]
    assert 0.5 < ratio < 2
    assert ratio / 4.0**2 < 0.2  # what it would be without the T^2


def test_distillation_masked_positions_get_no_gradient():
    student, teacher, targets = _randn(2, 4, 6, seed=13).requires_grad_(), _randn(2, 4, 6, seed=14), \
        _targets(2, 4, 6, seed=15)
    loss, _ = distillation_loss(student, teacher, targets, 0.5, 2.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert (grad[targets == -100] == 0).all()
    assert (grad[targets != -100].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("alpha, temperature", [(-0.1, 1.0), (1.5, 1.0), (0.5, 0.0), (0.5, -1.0)])
def test_distillation_rejects_bad_alpha_and_temperature(alpha, temperature):
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError):
        distillation_loss(logits, logits, torch.zeros(1, 2, dtype=torch.long), alpha, temperature)


# dpo_loss


def test_dpo_with_policy_equal_to_reference_is_ln2():
    chosen, rejected = _randn(5, seed=16) - 20, _randn(5, seed=17) - 20
    loss, parts = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), 0.1)
    assert abs(loss.item() - math.log(2)) < 1e-7
    assert parts["accuracy"] == 0 and parts["margin"] == 0


def test_dpo_gradient_raises_chosen_lowers_rejected_and_leaves_reference_alone():
    pc, pr = _randn(4, seed=18).requires_grad_(), _randn(4, seed=19).requires_grad_()
    rc, rr = _randn(4, seed=20).requires_grad_(), _randn(4, seed=21).requires_grad_()
    loss, _ = dpo_loss(pc, pr, rc, rr, 0.5)
    g_pc, g_pr, g_rc, g_rr = torch.autograd.grad(loss, (pc, pr, rc, rr), allow_unused=True)
    assert (g_pc < 0).all() and (g_pr > 0).all()  # a higher chosen log-probability lowers the loss
    assert g_rc is None and g_rr is None


def test_dpo_matches_hand_formula_float64():
    pc, pr, rc, rr = (_randn(6, seed=s) for s in (22, 23, 24, 25))
    beta = 0.7
    margins = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(6)]
    loss, parts = dpo_loss(pc, pr, rc, rr, beta)
    assert_close(loss.item(), sum(math.log1p(math.exp(-m)) for m in margins) / 6, rtol=1e-12, atol=0)
    assert parts["accuracy"].item() == sum(m > 0 for m in margins) / 6
    assert_close(parts["margin"].item(), sum(margins) / 6, rtol=1e-12, atol=1e-15)


# group_advantages


@pytest.mark.parametrize("dtype, value, size", [(torch.float32, 0.1, 7), (torch.float64, 0.1, 3)])
def test_group_advantages_equal_rewards_give_exact_zeros(dtype, value, size):
    # Sizes where r - mean(r) is not exactly 0 in that precision (mean of seven float32 0.1s, three float64 0.1s).
    rewards = torch.tensor([value] * size + [0.0] * (size - 1) + [1.0], dtype=dtype)
    for scale_by_std in (False, True):
        adv = group_advantages(rewards, size, scale_by_std)
        assert (adv[:size] == 0).all()
        assert (adv[size:] != 0).all()


def test_group_advantages_match_hand_computation():
    groups = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.2, 0.5, 0.9, 0.4]]
    rewards = torch.tensor(sum(groups, []), dtype=torch.float64)
    centred = [r - statistics.fmean(g) for g in groups for r in g]
    scaled = [(r - statistics.fmean(g)) / (statistics.stdev(g) + 1e-4) for g in groups for r in g]
    assert_close(group_advantages(rewards, 4), torch.tensor(centred, dtype=torch.float64), rtol=0, atol=1e-15)
    assert_close(group_advantages(rewards, 4, scale_by_std=True), torch.tensor(scaled, dtype=torch.float64),
                 rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n, group_size", [(7, 4), (6, 4), (4, 1)])
def test_group_advantages_reject_bad_n_and_group_size(n, group_size):
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(n), group_size)


# policy_gradient_loss


def _replies(lengths, T, seed):
    """logprobs (N, T) float64 with grad, and the reply mask (N, T) of the given lengths."""
    logprobs = (-_randn(len(lengths), T, seed=seed).abs()).requires_grad_()
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return logprobs, mask


def test_on_policy_ppo_cispo_and_reinforce_gradients_equal_the_hand_reinforce_gradient():
    logprobs, mask = _replies([5, 3, 1, 4], 5, seed=26)
    adv = _randn(4, seed=27)
    hand = -(adv[:, None] * logprobs * mask).sum() / mask.sum()
    (expected,) = torch.autograd.grad(hand, logprobs)
    for form in ({}, {"clip_eps": 10.0}, {"cispo_clip": 10.0}):
        loss, parts = policy_gradient_loss(logprobs, logprobs.detach(), adv, mask, **form)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert_close(grad, expected, rtol=1e-12, atol=1e-15, msg=str(form))
        assert parts["clipped_fraction"] == 0 and parts["kl"] == 0


def test_group_of_equal_rewards_gives_zero_gradient():
    logprobs, mask = _replies([4, 2, 3, 4, 1, 3], 4, seed=28)
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64), 3, True)
    for form in ({}, {"clip_eps": 0.2}, {"cispo_clip": 0.2}):
        loss, _ = policy_gradient_loss(logprobs, logprobs.detach() - 0.1, adv, mask, **form)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert (grad[:3] == 0).all()
        assert (grad[3:][mask[3:]] != 0).all()


def test_k3_is_nonnegative_zero_at_the_reference_and_unbiased():
    logp, ref = -_randn(3, 5, seed=29).abs(), -_randn(3, 5, seed=30).abs()
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k3(logp, logp.clone()) == 0).all()
    # Unbiased: its expectation over tokens drawn from the policy p is exactly KL(p || q).
    p, q = torch.softmax(_randn(6, seed=31), -1), torch.softmax(_randn(6, seed=32), -1)
    assert_close((p * kl_k3(p.log(), q.log())).sum(), (p * (p / q).log()).sum(), rtol=1e-12, atol=0)


def test_kl_penalty_adds_beta_times_the_token_mean_of_k3():
    logprobs, mask = _replies([3, 5], 5, seed=33)
    ref, adv, beta = -_randn(2, 5, seed=34).abs(), torch.tensor([0.5, -1.0], dtype=torch.float64), 0.04
    loss, parts = policy_gradient_loss(logprobs, logprobs.detach(), adv, mask, ref_logprobs=ref, kl_beta=beta)
    tokens = [(i, t) for i in range(2) for t in range(5) if mask[i, t]]
    d = {(i, t): (ref[i, t] - logprobs[i, t]).item() for i, t in tokens}
    k3 = {key: math.exp(d[key]) - d[key] - 1 for key in tokens}
    assert_close(parts["kl"].item(), sum(k3.values()) / len(tokens), rtol=1e-12, atol=0)
    expected = -sum(adv[i].item() - beta * k3[i, t] for i, t in tokens) / len(tokens)
    assert_close(loss.item(), expected, rtol=1e-12, atol=0)
    same, parts = policy_gradient_loss(logprobs, logprobs.detach(), adv, mask, ref_logprobs=logprobs.detach(),
                                       kl_beta=beta)
    assert parts["kl"] == 0
    assert_close(same, policy_gradient_loss(logprobs, logprobs.detach(), adv, mask)[0], rtol=0, atol=0)


def test_ppo_clip_stops_the_gradient_past_one_plus_eps():
    logprobs, mask = _replies([3, 3], 3, seed=35)
    shift = torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.0, -0.5]], dtype=torch.float64)  # ratios 1.65, 1, 0.61
    adv = torch.tensor([2.0, -3.0], dtype=torch.float64)
    loss, parts = policy_gradient_loss(logprobs, logprobs.detach() - shift, adv, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, logprobs)
    ratio, n = shift.exp(), 6
    # A > 0: past 1 + eps nothing more to gain, no gradient; below 1 - eps it still pulls up. A < 0 mirrored.
    expected = torch.tensor([[0.0, -1 * 2.0, -ratio[0, 2] * 2.0], [ratio[1, 0] * 3.0, 1 * 3.0, 0.0]]) / n
    assert_close(grad, expected.double(), rtol=1e-12, atol=0)
    assert_close(parts["clipped_fraction"].item(), 2 / 6, rtol=1e-6, atol=0)  # a float32 share


def test_cispo_clipped_token_keeps_the_clipped_weight_times_the_advantage():
    logprobs, mask = _replies([3, 2], 3, seed=36)
    shift = torch.tensor([[0.5, 0.0, -0.3], [0.5, 0.1, 0.0]], dtype=torch.float64)  # ratios 1.65, 1, 0.74 / ...
    adv = torch.tensor([2.0, -3.0], dtype=torch.float64)
    eps = 0.2
    loss, parts = policy_gradient_loss(logprobs, logprobs.detach() - shift, adv, mask, cispo_clip=eps)
    (grad,) = torch.autograd.grad(loss, logprobs)
    weight = shift.exp().clamp(max=1 + eps) * mask
    assert_close(grad, -weight * adv[:, None] / mask.sum(), rtol=1e-12, atol=0)
    assert grad[0, 0] == -(1 + eps) * 2.0 / 5 and grad[1, 0] == (1 + eps) * 3.0 / 5  # clipped, not zero
    assert_close(parts["clipped_fraction"].item(), 2 / 5, rtol=1e-6, atol=0)


def test_dapo_normalises_by_reply_tokens_not_by_replies():
    logprobs, mask = _replies([2, 4], 4, seed=37)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = policy_gradient_loss(logprobs, logprobs.detach(), adv, mask)
    token_level = -(1.0 * 2 + -1.0 * 4) / 6  # every token weighs the same: 1/3
    mean_of_means = -(1.0 + -1.0) / 2  # every reply weighs the same: 0
    assert token_level != mean_of_means
    assert_close(loss.item(), token_level, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert_close(grad, -adv[:, None] * mask / 6, rtol=1e-12, atol=0)


def test_padding_values_cannot_turn_the_loss_into_nan():
    logprobs, mask = _replies([2, 3], 4, seed=38)
    logprobs = logprobs.detach().float().requires_grad_()
    garbage = ~mask
    old = torch.where(garbage, -1000.0, logprobs.detach())  # exp(1000) is inf in float32
    ref = torch.where(garbage, 1000.0, logprobs.detach())
    for form in ({}, {"clip_eps": 0.2}, {"cispo_clip": 0.2}):
        loss, parts = policy_gradient_loss(logprobs, old, torch.tensor([1.0, -1.0]), mask, ref_logprobs=ref,
                                           kl_beta=0.1, **form)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and parts["kl"] == 0


def test_policy_gradient_rejects_two_clips_and_kl_without_reference():
    logprobs, mask = _replies([2], 2, seed=39)
    with pytest.raises(ValueError):
        policy_gradient_loss(logprobs, logprobs.detach(), torch.ones(1), mask, clip_eps=0.2, cispo_clip=0.2)
    with pytest.raises(ValueError):
        policy_gradient_loss(logprobs, logprobs.detach(), torch.ones(1), mask, kl_beta=0.1)
