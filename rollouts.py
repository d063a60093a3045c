"""
rollouts.py: objective = "grpo", reinforcement learning on verifiable rewards: the policy's own replies are its
training data. At the start of each round the model, as it is, samples group_size replies to each of a batch of
a task's prompts (tasks.py); the task's verifier scores them; train.py's one loop then backpropagates
objectives.policy_gradient_loss over them, micro-batch by micro-batch, through the same DDP/ZeRO engine as
every other loss.

    python train.py config/grpo_add2.py      # from an SFT run: sample, score, reinforce

The one idea: the baseline is the group. A reply's advantage is its reward minus the mean reward of the
replies sampled for the same prompt (GRPO, Shao et al. 2024), so no value network is trained: a reply is made
more likely exactly when it did better than its siblings, and a group whose replies all scored alike (all
right, or all wrong) teaches nothing. With A fixed, the gradient of -sum_t A log pi(token t), summed over every
reply token of the batch and divided by their number (DAPO), is the REINFORCE estimate of the gradient of the
expected reward (Williams 1992): replies are sampled from pi, so E[A grad log pi] = grad E[reward] - 0, the
baseline's term vanishing because E[grad log pi] = 0.

A round's replies depend only on (seed, round) and the weights: its prompts are drawn from the task's train
split with a seed made of (seed, round), and each group is sampled under its own seed, (seed, round, prompt),
so any number of ranks, each sampling its share of the groups, samples the same replies, and a resumed run
samples what the straight run did.
"""

import hashlib
import itertools
import time

import torch
import torch.nn.functional as F

from eval import replies, reply_text, reply_tokens
from model import Transformer
from objectives import group_advantages, policy_gradient_loss, target_rows, token_logprobs
from parallel import all_reduce_sum
from tasks import TASKS, examples, reward
from tokenizer import PAD_ID, Tokenizer


def seed_of(*parts) -> int:
    """A 63-bit seed from a tuple of whole numbers, by a fixed hash: (seed, round) and (seed, round + 1) give
    unrelated streams, as the same tuple always gives the same one."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


class Policy:
    """The data and the loss of objective = "grpo": rollout() samples and scores a round's replies, loss() turns
    one micro-batch of them into the policy-gradient loss, evaluate() scores greedy replies to held-out problems."""

    def __init__(self, c: dict, data, reference: Transformer, rank: int, world_size: int):
        knob = TASKS[c["task"]][2][0]
        self.task, self.difficulty = c["task"], {knob: c["task_difficulty"]} if c["task_difficulty"] else {}
        try:
            # The held-out set eval.py scores by default (the test split, seed 0): pass@1 here is its exact match.
            self.held_out = list(itertools.islice(examples(self.task, "test", 0, **self.difficulty),
                                                  c["eval_problems"]))
        except ValueError as e:
            raise SystemExit(f"task {self.task}: {e}") from None
        self.tokenizer = Tokenizer(data.tokenizer_path)
        self.rank, self.world_size, self.device, self.seed = rank, world_size, data.device, c["seed"]
        self.batch_size, self.group_size, self.block_size = c["batch_size"], c["group_size"], c["block_size"]
        # This rank's prompts per round: its replies (batch_size * its micro-batches) in whole groups.
        self.prompts = c["batch_size"] * (c["gradient_accumulation_steps"] // world_size) // c["group_size"]
        self.max_new_tokens, self.temperature, self.scale_by_std = c["max_new_tokens"], c["temperature"], c["scale_by_std"]
        self.ppo_epochs = c["ppo_epochs"]
        self.loss_options = {"clip_eps": c["clip_eps"] or None, "cispo_clip": c["cispo_clip"] or None,
                             "kl_beta": c["kl_beta"]}
        self.reference = reference  # of the KL term and metric (train.frozen_reference)
        self.round, self.old_logprobs = None, {}

    def train_batch(self, it: int, micro_step: int) -> tuple[int, int]:
        """The loop reads a micro-batch one ahead, before the step that precedes it has updated the weights; a
        round's replies must come from the updated policy, so they are sampled only when loss() needs them."""
        return it, micro_step

    def _round_prompts(self, round_: int) -> list[dict]:
        """This rank's share of round_'s prompts: the same draw on every rank, cut at rank * prompts."""
        first = self.rank * self.prompts
        stream = examples(self.task, "train", seed_of(self.seed, round_), **self.difficulty)
        return list(itertools.islice(stream, first, first + self.prompts))

    @torch.no_grad()
    def rollout(self, model: Transformer, it: int) -> None:
        """Samples and scores the replies of step it's round, unless they are already held. Each row of the
        training tensors is prompt + reply: x the tokens, y the next ones with -100 on the prompt (and padding),
        so only the policy's own tokens are targets, its closing <|im_end|> included."""
        round_ = it // self.ppo_epochs
        if round_ == self.round:
            return
        t0, model_was_training = time.time(), model.training
        model.eval()
        sequences, rewards = [], []
        devices = [self.device] if self.device.startswith("cuda") else []
        for i, example in enumerate(self._round_prompts(round_)):
            prompt = self.tokenizer.render_chat(example["messages"][:-1], generation_prompt=True)[0]
            if len(prompt) + self.max_new_tokens > self.block_size:
                raise SystemExit(f"a {self.task} prompt of {len(prompt)} tokens plus max_new_tokens="
                                 f"{self.max_new_tokens} is longer than the model's block_size={self.block_size}")
            with torch.random.fork_rng(devices=devices):  # the group's own seed; the training RNG is untouched
                torch.manual_seed(seed_of(self.seed, round_, self.rank * self.prompts + i))
                group = reply_tokens(model, [prompt] * self.group_size, self.max_new_tokens, self.temperature)
            for ids in group:
                sequences.append((prompt, ids))
                rewards.append(reward(example, reply_text(self.tokenizer, ids)))
        model.train(model_was_training)
        x, y = target_rows([(p + r, [0] * len(p) + [1] * len(r)) for p, r in sequences], PAD_ID)  # (N, T)
        rewards = torch.tensor(rewards, dtype=torch.float64)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.advantages = group_advantages(rewards, self.group_size, self.scale_by_std).float().to(self.device)
        same = (self.advantages.reshape(-1, self.group_size) == 0).all(-1)  # exact 0s: group_advantages
        # Sums over every rank: replies, their rewards, their tokens, groups of equal rewards, tokens trained.
        trained = sum(len(p) + len(r) - 1 for p, r in sequences)
        totals = all_reduce_sum(torch.tensor([len(sequences), rewards.sum(), (y != -100).sum(), same.sum(), trained],
                                             dtype=torch.float64, device=self.device)).tolist()
        self.reply_tokens = totals[2]  # the denominator of the step's token mean, the whole batch's
        self.step_tokens = totals[4]
        self.stats = {"reward": totals[1] / totals[0], "reply_length": totals[2] / totals[0],
                      "zero_advantage_groups": totals[3] / (totals[0] / self.group_size),
                      "sample_s": time.time() - t0}
        self.round, self.old_logprobs = round_, {}

    def loss(self, train_model, model: Transformer, it: int, micro_step: int):
        """Micro-batch micro_step's policy-gradient loss, weighted by its share of the step's reply tokens (times
        world_size, which the engine's average divides out), so the step's gradient is that of one token mean
        over the whole batch; and its detached metrics, stacked (kl, entropy, clipped_fraction), weighted alike."""
        self.rollout(model, it)
        rows = slice(micro_step * self.batch_size, (micro_step + 1) * self.batch_size)
        x, y, advantages = self.x[rows], self.y[rows], self.advantages[rows]
        logits, _ = train_model(x)
        logprobs = token_logprobs(logits, y)  # (B, T), 0 off the replies
        if it % self.ppo_epochs == 0:
            # The round's first step runs on the weights that sampled it: pi_old is pi, detached. Later steps
            # of the round (ppo_epochs > 1) reuse these, so their ratio pi / pi_old is the importance weight.
            self.old_logprobs[micro_step] = logprobs.detach()
        with torch.no_grad():
            ref_logprobs = token_logprobs(self.reference(x)[0], y)
            logp = F.log_softmax(logits.detach().float(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)  # (B, T): of the policy's next-token distribution
        mask = y != -100
        loss, parts = policy_gradient_loss(logprobs, self.old_logprobs[micro_step], advantages, mask,
                                           ref_logprobs=ref_logprobs, **self.loss_options)
        n = mask.sum()
        metrics = torch.stack([parts["kl"], (entropy * mask).sum() / n.clamp(min=1), parts["clipped_fraction"]])
        share = n * self.world_size / max(1.0, self.reply_tokens)
        loss = (loss + model.auxiliary_loss()) * share
        return loss, loss.detach(), metrics * share

    def record(self, parts: list[float]) -> dict:
        """What metrics.jsonl gets of the step: its round's sampling statistics and the loss's metrics."""
        return {**self.stats, "kl": parts[0], "entropy": parts[1], "clipped_fraction": parts[2]}

    def evaluate(self, model: Transformer) -> dict:
        """pass@1 on the held-out problems: the share whose greedy reply the verifier rewards 1, spread over the
        ranks (rank r scores problems r, r + world_size, ...) and summed back."""
        mine = self.held_out[self.rank::self.world_size]  # the model is in eval mode (train.evaluate)
        answers = replies(model, self.tokenizer, [e["messages"][:-1] for e in mine], self.max_new_tokens, 0.0, 64)
        correct = sum(reward(e, a) == 1.0 for e, a in zip(mine, answers))
        totals = all_reduce_sum(torch.tensor([correct, len(mine)], dtype=torch.float64, device=self.device))
        return {"pass@1": (totals[0] / totals[1]).item()}
