"""
preferences.py: objective = "dpo", Direct Preference Optimization (Rafailov et al. 2023) on pairs of replies to
the same prompt, one preferred ("chosen") over the other ("rejected"). train.py's one loop trains on them; this
file reads the pairs, holds the frozen reference's log-probabilities and computes objectives.dpo_loss.

    python tasks.py --task addition --digits 2 --n 2000 --pairs samples.jsonl --out pairs.jsonl
    python train.py config/dpo_add2.py

The one idea: the reference never changes, so its part of the loss is a constant per pair. DPO's implicit reward
of a reply is beta (log pi(reply) - log pi_ref(reply)), and the loss is a logistic loss on the chosen reply's
reward minus the rejected one's. log pi_ref of every reply is computed once, before the first step, with the model
the run starts from, and stored; the run then needs no second model in memory and no second forward per step.

A pair file is JSONL, one pair a line, in TRL's shape {"prompt": [messages], "chosen": [messages], "rejected":
[messages]} or minimind's {"chosen": [whole conversation], "rejected": [whole conversation]} (the prompt then is
their common start). Each side is rendered with the chat template and masked as SFT data is: the log-probability
of a side is the sum over its assistant tokens (tokenizer.render_chat's mask). Turns the two sides share add the
same amount to both and cancel in the margin, so only the replies that differ move the loss.
"""

import functools
import json

import torch

from model import Transformer
from objectives import dpo_loss, sequence_logprobs, target_rows
from parallel import all_reduce_sum
from rollouts import seed_of
from tokenizer import PAD_ID, Tokenizer, conversation_messages

MAX_WARNINGS = 5


def pair_conversations(record) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected) as whole conversations, each ending with its assistant reply; ValueError says what is
    wrong with a record that is not a usable pair."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ValueError('not a JSON object with "chosen" and "rejected"')
    prompt = record.get("prompt", [])
    if not isinstance(prompt, list):
        raise ValueError('"prompt" is not a list of messages')
    sides = []
    for side in ("chosen", "rejected"):
        if not isinstance(record[side], list):
            raise ValueError(f'"{side}" is not a list of messages')
        messages = conversation_messages({"messages": prompt + record[side]})
        if messages[-1]["role"] != "assistant":
            raise ValueError(f'"{side}" does not end with an assistant reply')
        sides.append(messages)
    if sides[0] == sides[1]:
        raise ValueError("chosen and rejected are the same conversation")
    return sides[0], sides[1]


def read_pairs(path: str, tokenizer: Tokenizer, block_size: int) -> list[tuple]:
    """Every usable pair of a pair file, as ((chosen ids, mask), (rejected ids, mask)); a line that is no pair, or
    whose sides do not fit block_size + 1 tokens, is skipped, and the skips are counted and reported with their
    line numbers. A file without a usable pair is an error."""
    pairs, skipped = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    sides = [tokenizer.render_chat(side) for side in pair_conversations(json.loads(line))]
                except json.JSONDecodeError:
                    skipped.append(f"{path}:{lineno}: not valid JSON")
                    continue
                except ValueError as e:
                    skipped.append(f"{path}:{lineno}: {e}")
                    continue
                if max(len(ids) for ids, _ in sides) > block_size + 1:
                    skipped.append(f"{path}:{lineno}: longer than block_size={block_size} tokens")
                    continue
                pairs.append(tuple(sides))
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read the pair file {path}: {e}") from None
    for message in skipped[:MAX_WARNINGS]:
        print(f"warning: {message}, pair skipped")
    if skipped:
        print(f"{path}: {len(pairs):,} pairs read, {len(skipped):,} lines skipped")
    if not pairs:
        raise SystemExit(f"{path} holds no usable preference pair ({len(skipped)} lines skipped)")
    return pairs


class Preferences:
    """The data and the loss of objective = "dpo": train_batch() names a micro-batch of pairs, loss() computes
    its DPO loss against the stored reference log-probabilities, evaluate() the held-out preference accuracy."""

    def __init__(self, c: dict, data, reference: Transformer, rank: int, world_size: int, autocast):
        tokenizer = Tokenizer(data.tokenizer_path)
        self.pairs = {"train": read_pairs(c["dpo_pairs"], tokenizer, c["block_size"]),
                      "val": read_pairs(c["dpo_val_pairs"], tokenizer, c["block_size"])}
        self.rank, self.world_size, self.device, self.seed = rank, world_size, data.device, c["seed"]
        self.batch_size, self.beta, self.nll_weight = c["batch_size"], c["dpo_beta"], c["dpo_nll_weight"]
        self.accum_steps = c["gradient_accumulation_steps"] // world_size
        self.step_pairs = c["batch_size"] * c["gradient_accumulation_steps"]  # over every rank
        # The reference (train.frozen_reference) is needed only for these: the caller drops it afterwards.
        self.reference_logprobs = {split: self._logprobs(reference, pairs, autocast)
                                   for split, pairs in self.pairs.items()}

    @torch.no_grad()
    def _logprobs(self, model: Transformer, pairs: list[tuple], autocast) -> torch.Tensor:
        """(pairs, 2): log p(chosen), log p(rejected) of each pair under model, in float64."""
        out = []
        for lo in range(0, len(pairs), self.batch_size):
            x, y = self.rows(pairs[lo:lo + self.batch_size])
            with autocast:
                logits, _ = model(x)
            out.append(sequence_logprobs(logits, y).double().reshape(2, -1).T)
        return torch.cat(out)

    def rows(self, pairs: list[tuple]):
        """x, y (2B, T): the chosen sides then the rejected ones, right-padded with the targets masked as SFT's."""
        x, y = target_rows([side for sides in zip(*pairs) for side in sides], PAD_ID)
        return x.to(self.device), y.to(self.device)

    @functools.lru_cache(maxsize=2)  # a step's positions span at most two epochs
    def _order(self, epoch: int) -> list[int]:
        n = len(self.pairs["train"])
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(self.seed, epoch))).tolist()

    def _pair_at(self, position: int) -> int:
        """The train pair at a position of the endless sequence of epochs, each a permutation seeded by (seed,
        epoch): step it's global batch is positions it * step_pairs onward, so any world size and a resumed
        run see the same pairs at the same step."""
        epoch, i = divmod(position, len(self.pairs["train"]))
        return self._order(epoch)[i]

    def pair_indices(self, it: int, micro_step: int) -> list[int]:
        """The train pairs of step it's micro-batch micro_step on this rank."""
        first = it * self.step_pairs + (self.rank * self.accum_steps + micro_step) * self.batch_size
        return [self._pair_at(position) for position in range(first, first + self.batch_size)]

    def train_batch(self, it: int, micro_step: int) -> tuple[int, int]:
        return it, micro_step

    def loss(self, train_model, model: Transformer, it: int, micro_step: int):
        """Micro-batch micro_step's DPO loss, a mean over its pairs divided by the micro-batches per process (the
        engine's average over ranks makes it the global batch's mean); its (accuracy, margin) weighted alike."""
        indices = self.pair_indices(it, micro_step)
        x, y = self.rows([self.pairs["train"][i] for i in indices])
        logits, _ = train_model(x)
        chosen, rejected = sequence_logprobs(logits, y).reshape(2, -1)  # (B,) each
        reference = self.reference_logprobs["train"][indices].to(self.device)
        loss, parts = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.beta)
        # The margin can also grow by making both replies less likely, the chosen one less slowly, and a model
        # that answers by its most likely reply then gets worse. A cross-entropy term on the chosen reply holds it
        # up (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization"; Llama 3 does the same): its
        # per-token negative log-likelihood, a mean over the pairs as the DPO term is.
        chosen_nll = (-chosen / (y[:len(indices)] != -100).sum(-1)).mean()
        loss = loss + self.nll_weight * chosen_nll
        if micro_step == 0:  # this step's tokens over all ranks, for tokens/s (every rank knows every index)
            self.step_tokens = sum(len(ids) - 1 for p in range(it * self.step_pairs, (it + 1) * self.step_pairs)
                                   for ids, _ in self.pairs["train"][self._pair_at(p)])
        share = 1 / self.accum_steps
        loss = (loss + model.auxiliary_loss()) * share
        return loss, loss.detach(), torch.stack([parts["accuracy"], parts["margin"], chosen_nll.detach()]) * share

    def record(self, parts: list[float]) -> dict:
        return {"preference_accuracy": parts[0], "margin": parts[1], "chosen_nll": parts[2]}

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> dict:
        """On the held-out pairs: the share where the chosen reply's implicit reward beats the rejected one's,
        and the mean margin beta ((pc - rc) - (pr - rr)); rank r scores pairs r, r + world_size, ..."""
        n = len(self.pairs["val"])
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        # Every rank runs as many forwards (stage 3 and FSDP2 gather parameters in each): a rank whose share has
        # run out scores pair 0 again and counts nothing of it.
        for lo in range(0, -(-n // self.world_size), self.batch_size):
            start = self.rank + lo * self.world_size  # this rank's pairs lo .. lo + batch_size
            indices = list(range(start, min(n, start + self.batch_size * self.world_size), self.world_size))
            x, y = self.rows([self.pairs["val"][i] for i in indices or [0]])
            logits, _ = model(x)
            policy = sequence_logprobs(logits, y).double().reshape(2, -1).T  # (B, 2)
            shift = policy - self.reference_logprobs["val"][indices or [0]].to(self.device)
            margin = self.beta * (shift[:, 0] - shift[:, 1])
            if indices:
                sums += torch.stack([(margin > 0).sum().double(), margin.sum(), torch.tensor(len(indices))])
        all_reduce_sum(sums)
        return {"preference_accuracy": (sums[0] / sums[2]).item(), "margin": (sums[1] / sums[2]).item()}
