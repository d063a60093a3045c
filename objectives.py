"""objectives.py: the losses of post-training (distillation, DPO, GRPO-style policy gradients), as plain functions.

    from objectives import distillation_loss, dpo_loss, group_advantages, policy_gradient_loss

Pure torch on tensors the caller already has: logits (B, T, V) and targets (B, T), with -100 where a position is
not a target (a prompt token, padding), exactly as the model's cross-entropy takes them. No model code and no loop
here; the loop that feeds them is train.py's, shared by all.

The one idea: every objective is a weighted sum of the log-probabilities of tokens the model could write, and
they differ only in which tokens and which weights. Read off their gradients:

    SFT            the reference reply's tokens              weight 1
    distillation   every token of the vocabulary             the teacher's probability of it
    DPO            the chosen and the rejected reply         +beta s and -beta s, s = sigmoid(-reward margin)
    policy grad.   the tokens the policy itself sampled      the reply's advantage (times a clipped ratio)

Log-probabilities are computed in at least float32: a bf16 log-softmax rounds them to 2-3 digits.
"""

import torch
import torch.nn.functional as F


def _log_softmax(logits):
    # At least float32 (bf16 and fp16 are raised, float64 stays float64, so tests can compare exactly).
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def token_logprobs(logits, targets):
    """log p(targets[b, t]) under logits[b, t]: (B, T, V), (B, T) -> (B, T), and 0 where targets == -100."""
    logp = _log_softmax(logits)  # (B, T, V)
    is_target = targets != -100
    # gather cannot index -100; clamp to a real token, then overwrite those positions (no gradient reaches them).
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(is_target, picked, 0.0)


def target_rows(sequences, pad_id):
    """Token sequences, each (ids, mask) with mask 1 on the tokens the loss trains on (tokenizer.render_chat's
    mask, or a sampled reply's tokens), as one right-padded batch: x (N, T) the inputs, y (N, T) the next token
    where the mask is 1 and -100 everywhere else (the prompt, the padding), T = the longest sequence - 1. Padding
    on the right leaves every real token at its own position, so no attention mask is needed: a causal model
    never looks right."""
    width = max(len(ids) for ids, _ in sequences) - 1
    x = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    y = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        ids, mask = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, :len(ids) - 1] = torch.where(mask[1:], ids[1:], -100)
    return x, y


def sequence_logprobs(logits, targets):
    """log p(reply) = sum over t of log p(token t): (B, T, V), (B, T) -> (B,). What DPO compares."""
    return token_logprobs(logits, targets).sum(-1)


def distillation_loss(student_logits, teacher_logits, targets, alpha, temperature):
    """Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network"):

        loss = alpha CE(student, targets) + (1 - alpha) T^2 KL(softmax(teacher / T) || softmax(student / T))

    both averaged over the target positions (targets != -100). Returns (loss, {"ce", "kl"}), parts detached."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    is_target = targets != -100
    # A window with no targets adds 0 instead of 0 / 0 = NaN (as model.py's loss does).
    n = is_target.sum().clamp(min=1)
    # The hard term at T = 1: the student should still put its mass on the reference token.
    ce = -token_logprobs(student_logits, targets).sum() / n
    student_logp = _log_softmax(student_logits / temperature)  # (B, T, V)
    teacher_logp = _log_softmax(teacher_logits.detach() / temperature)  # the teacher is a fixed target
    # kl_div(input, target) is sum target * (log target - input): it expects *log*-probabilities as input. Given
    # probabilities q it computes sum p (log p - q), which is not 0 when q = p, and whose gradient -p pushes up
    # every probability the teacher likes instead of moving q towards p. log_target=True takes the teacher as
    # log-probabilities too, so no log(0) is ever taken; the pointwise terms are exactly 0 when student == teacher.
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # (B, T)
    kl = torch.where(is_target, kl, 0.0).sum() / n
    # The soft term's gradient, (q - p) / T, is ~1 / T^2 the size for logits of a given spread; T^2 keeps the
    # balance between the two terms the same whatever T is (Hinton et al., section 2).
    loss = alpha * ce + (1 - alpha) * temperature**2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model
    is Secretly a Reward Model"), on per-sequence summed log-probabilities (B,) (sequence_logprobs):

        loss = -log sigmoid(beta ((pc - rc) - (pr - rr)))          mean over the pairs

    beta (log pi - log ref) is the implicit reward; the loss is a logistic loss on the chosen reply's reward
    margin over the rejected one. Returns (loss, {"accuracy", "margin"}), parts detached."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_reward = beta * (policy_chosen - ref_chosen.detach())  # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected.detach())
    margin = chosen_reward - rejected_reward
    # logsigmoid, not log(sigmoid()): a margin of -100 would round sigmoid to 0 and give -inf.
    loss = -F.logsigmoid(margin).mean()
    parts = {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach()}
    return loss, parts


def group_advantages(rewards, group_size, scale_by_std=False):
    """GRPO's advantage (Shao et al. 2024, "DeepSeekMath"): each reply's reward minus the mean reward of its group
    (the replies sampled for the same prompt), optionally divided by the group's standard deviation + 1e-4.

    rewards (N,) laid out group after group, N = groups * group_size -> advantages (N,)."""
    if group_size < 2:
        # A group of one is its own baseline: every advantage would be 0.
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards: {rewards.numel()} is not a multiple of group_size {group_size}")
    r = rewards.reshape(-1, group_size)  # (groups, group_size)
    # Subtract the group's first reward before taking the mean (the same advantages: the mean shifts with it), so
    # a group of equal rewards gets exactly 0: the float32 mean of seven 0.1s is not exactly 0.1.
    r = r - r[:, :1]
    adv = r - r.mean(-1, keepdim=True)
    if scale_by_std:
        # The eps keeps an all-equal group (std 0) at 0 / 1e-4 = 0 and stops a nearly equal one from being
        # blown up. Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") argues against this
        # division: it up-weights the prompts that are nearly always or never solved, a bias by difficulty.
        adv = adv / (r.std(-1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def kl_k3(logprobs, ref_logprobs):
    """Per-token estimate of KL(policy || ref) from a token sampled from the policy, Schulman's k3 ("Approximating
    KL Divergence", 2020), as GRPO uses it: with d = log ref - log pi,  k3 = exp(d) - d - 1.

    >= 0 for every token (e^d >= 1 + d), and unbiased: E_pi[e^d] = 1, so E[k3] = E[-d] = KL. Same shape in, out."""
    d = ref_logprobs.detach() - logprobs
    return d.exp() - d - 1


def policy_gradient_loss(logprobs, old_logprobs, advantages, mask, clip_eps=None, cispo_clip=None,
                         ref_logprobs=None, kl_beta=0.0):
    """Token-level policy-gradient loss for sampled replies, in one of three forms:

        default      ratio A, ratio = pi / pi_old: on-policy REINFORCE (Williams 1992) with a group baseline
        clip_eps     min(ratio A, clip(ratio, 1 - eps, 1 + eps) A): PPO's clipped surrogate (Schulman et al. 2017),
                     as GRPO uses it
        cispo_clip   sg(min(ratio, 1 + eps)) A log pi: CISPO (MiniMax, 2025, "MiniMax-M1")

    minus kl_beta k3 when ref_logprobs is given, summed over all reply tokens of the batch and divided by their
    number (DAPO, Yu et al. 2025). loss = -that.

    logprobs (N, T) of the sampled tokens under the current policy (with grad), old_logprobs (N, T) under the
    policy that sampled them, advantages (N,), mask (N, T) true on reply tokens. Returns (loss, {"kl",
    "clipped_fraction"}), parts detached."""
    if clip_eps is not None and cispo_clip is not None:
        raise ValueError("give clip_eps (PPO) or cispo_clip (CISPO), not both")
    if kl_beta != 0 and ref_logprobs is None:
        raise ValueError(f"kl_beta={kl_beta} needs ref_logprobs")
    mask = mask.bool()
    n = mask.sum().clamp(min=1)
    adv = advantages.detach()[:, None]  # (N, 1): a reply's advantage is every one of its tokens'
    # Off the mask the log-probabilities are whatever padding gave: zero the difference before exp, so a stray
    # value cannot overflow to inf, and inf * 0 = NaN in the backward.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)
    ratio = log_ratio.exp()  # (N, T)
    clipped = torch.zeros_like(mask)
    if clip_eps is not None:
        # Once the ratio has moved past 1 +- eps in the direction the advantage rewards, min picks the clipped,
        # constant term: no gradient, so one batch of samples cannot move the policy far from the one that drew it.
        objective = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    elif cispo_clip is not None:
        # Clip the importance weight, not the update: the weight is a constant, so a clipped token still
        # contributes (1 + eps) A grad log pi, where PPO drops it (the paper: rare tokens like "However", "Wait").
        # MiniMax-M1 has a lower bound too but sets it out of reach; only the upper one is kept here.
        weight = ratio.clamp(max=1 + cispo_clip).detach()
        objective = weight * adv * logprobs
        clipped = ratio > 1 + cispo_clip
    else:
        # ratio, not log pi: on-policy the gradient is the same (d ratio = ratio d log pi, and ratio = 1 there),
        # and should a batch of samples be reused for a second step, the ratio is the importance weight it needs.
        objective = ratio * adv
    kl = torch.zeros_like(objective)
    if ref_logprobs is not None:
        kl = kl_k3(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0))  # 0 off the mask
    # One sum over every reply token of the batch, not a mean per reply first: that would give each token of a
    # long reply less weight than a short reply's, which DAPO finds lets long, rambling replies go unpunished.
    loss = -torch.where(mask, objective - kl_beta * kl, 0.0).sum() / n
    parts = {"kl": (kl.sum() / n).detach(), "clipped_fraction": ((clipped & mask).sum() / n).detach()}
    return loss, parts
