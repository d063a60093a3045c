"""rollouts.py, objective = "grpo": the replies it trains on, the gradient it computes from them (against
per-reply log-probabilities from unpadded forwards in float64), the same steps on one process and on two, a
resumed run equal to the straight one, and the configurations it refuses."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from test_train import assert_same_weights, records, run, weights

# addition_sft (conftest) answers about 1 in 20 one-digit additions right when sampling at temperature 1, so
# some groups of 4 hold both a right and a wrong reply: their advantages, and the gradient, are not zero.
GRPO = ["--objective=grpo", "--task=addition", "--task_difficulty=1", "--batch_size=8",
        "--gradient_accumulation_steps=2", "--group_size=4", "--max_new_tokens=8", "--eval_problems=20",
        "--eval_iters=1", "--log_interval=1", "--warmup_iters=0", "--learning_rate=1e-3", "--max_iters=4",
        "--eval_interval=2"]


def grpo(addition_sft, out_dir, *args):
    return [f"--init_from={addition_sft[0]}", f"--data_dir={addition_sft[1]}", f"--out_dir={out_dir}", *GRPO, *args]


def steps(out_dir):
    return [r for r in records(out_dir) if "loss" in r]


def test_one_process_and_two_ranks_sample_the_same_replies_and_take_the_same_steps(tmp_path, addition_sft):
    run(grpo(addition_sft, tmp_path / "one"))
    run(grpo(addition_sft, tmp_path / "two"), launcher=(sys.executable, "-m", "torch.distributed.run",
                                                   "--nproc_per_node=2"))
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for key in ("reward", "reply_length", "zero_advantage_groups"):  # the same replies, scored alike
            assert a[key] == b[key], key
        for key in ("loss", "grad_norm", "kl", "entropy", "clipped_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # Not a trivial equality: some groups held different rewards, so the steps moved the weights.
    assert min(r["zero_advantage_groups"] for r in one) < 1 and max(r["grad_norm"] for r in one) > 0
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), tol=1e-6)
    evals = [r for r in records(tmp_path / "one") if "pass@1" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4]
    assert all(0 <= r["pass@1"] <= 1 and "val_loss" in r for r in evals)
    assert one[0]["kl"] == 0 and one[-1]["kl"] > 0  # the policy starts as its reference, then leaves it


def test_resume_samples_and_steps_as_the_straight_run_with_ppo_epochs_clip_and_kl(tmp_path, addition_sft):
    options = ["--ppo_epochs=2", "--clip_eps=0.2", "--kl_beta=0.1", "--scale_by_std=True"]
    run(grpo(addition_sft, tmp_path / "straight", *options))
    run(grpo(addition_sft, tmp_path / "resumed", *options, "--max_iters=2"))
    run(grpo(addition_sft, tmp_path / "resumed", *options, "--init_from=resume"))
    a, b = records(tmp_path / "straight"), records(tmp_path / "resumed")
    drop = ("elapsed_s", "tokens_per_s", "mfu", "comm_wait_s", "sample_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"), tol=0)
    # Steps 1 and 3 reuse the round of step 0 and 2 (the same rewards), weighted by pi / pi_old.
    rounds = steps(tmp_path / "straight")
    assert rounds[0]["reward"] == rounds[1]["reward"] and rounds[2]["reward"] == rounds[3]["reward"]


def policy_of(addition_sft, **overrides):
    """A Policy as train.py builds it, for one process, and the model it would train."""
    from model import ModelConfig, Transformer
    from rollouts import Policy
    from train import DEFAULTS, frozen_reference

    base = torch.load(os.path.join(addition_sft[0], "ckpt.pt"), weights_only=False)
    c = DEFAULTS | base["config"] | {"objective": "grpo", "task": "addition", "task_difficulty": 1,
                                     "batch_size": 4, "gradient_accumulation_steps": 3, "group_size": 4,
                                     "max_new_tokens": 8, "eval_problems": 8, "seed": 4} | overrides
    data = SimpleNamespace(tokenizer_path=os.path.join(addition_sft[1], "tokenizer.model"), device="cpu")
    model_config = ModelConfig(**base["model_config"])
    model = Transformer(model_config)
    model.load_state_dict(base["model"])
    return Policy(c, data, frozen_reference(model_config, base, "cpu"), 0, 1), model


def test_the_step_gradient_is_reinforce_over_every_reply_token_of_the_round(addition_sft):
    """The loss over the round's three micro-batches, as the loop accumulates it, against the hand-written
    REINFORCE objective -(1 / reply tokens) sum_i A_i sum_t log pi(token t of reply i), each reply's log-probability
    computed from its own prompt + reply, unpadded, in float64."""
    from objectives import group_advantages
    from tasks import reward
    from tokenizer import IM_END_ID

    policy, model = policy_of(addition_sft)  # seed 4: two of its round's three groups hold a right and a wrong reply
    model.train()
    for micro_step in range(3):
        loss, _, _ = policy.loss(model, model, 0, micro_step)
        loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}

    reference = model.double()
    reference.zero_grad()
    replies = [policy.y[row][policy.y[row] != -100] for row in range(len(policy.y))]
    assert len(replies) == 12 and all(len(r) <= 8 for r in replies)
    assert any(r[-1] == IM_END_ID for r in replies)
    reply_logprobs, rewards = [], []
    for row, reply in enumerate(replies):
        start = int((policy.y[row] != -100).nonzero()[0])  # the prompt is x[row, :start + 1], unpadded
        prompt = policy.x[row, :start + 1]
        example = policy._round_prompts(0)[row // 4]
        assert prompt.tolist() == policy.tokenizer.render_chat(example["messages"][:-1], generation_prompt=True)[0]
        logits, _ = reference(torch.cat([prompt, reply[:-1]])[None])
        logprobs = torch.log_softmax(logits[0, start:], -1).gather(-1, reply[:, None]).sum()
        text = policy.tokenizer.decode(reply[:-1].tolist() if reply[-1] == IM_END_ID else reply.tolist())
        rewards.append(reward(example, text))
        reply_logprobs.append(logprobs)
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4)
    assert torch.equal(advantages.float(), policy.advantages) and advantages.abs().sum() > 0
    n_tokens = sum((policy.y != -100).sum(-1)).item()
    objective = -sum(a * lp for a, lp in zip(advantages, reply_logprobs)) / n_tokens
    objective.backward()
    for name, p in reference.named_parameters():
        assert torch.allclose(got[name].double(), p.grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("overrides, message", [
    ({"task": "chess"}, "needs task, one of addition"),
    ({"init_from": "scratch"}, "set init_from to the out_dir of a fine-tuned run"),
    ({"group_size": 1}, "group_size must be at least 2"),
    ({"group_size": 3}, "is not a multiple of group_size=3"),
    ({"zero_stage": 3}, "use zero_stage 0, 1 or 2"),
    ({"parallel": "fsdp2"}, "use zero_stage 0, 1 or 2"),
    ({"dropout": 0.1}, "needs dropout=0"),
    ({"always_save_checkpoint": False}, "saves at every evaluation"),
    ({"ppo_epochs": 3}, "must be multiples of ppo_epochs=3"),
    ({"clip_eps": 0.2, "cispo_clip": 1.0}, "set one of them"),
])
def test_grpo_settings_that_cannot_work_are_one_sentence(overrides, message):
    from train import DEFAULTS, check_post_training_config

    good = DEFAULTS | {"objective": "grpo", "task": "addition", "init_from": "out/sft", "batch_size": 8,
                       "gradient_accumulation_steps": 2, "group_size": 4, "max_iters": 8, "eval_interval": 4}
    check_post_training_config(good, 1)
    with pytest.raises(SystemExit, match=message):
        check_post_training_config(good | overrides, 1)


def test_a_task_without_grpo_and_a_prompt_too_long_for_the_window_are_refused(tmp_path, addition_sft):
    from train import DEFAULTS, check_config

    with pytest.raises(SystemExit, match="set that objective too"):
        check_config(DEFAULTS | {"task": "addition"}, 1)
    result = run(grpo(addition_sft, tmp_path / "long", "--max_new_tokens=40"), check=False)
    assert result.returncode != 0 and "longer than the model's block_size=64" in result.stderr
    assert "Traceback" not in result.stderr
