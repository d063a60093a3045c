"""
eval.py: score a checkpoint's replies, on a verifiable task of tasks.py or against the replies of any
conversation file.

    python eval.py --ckpt out/sft_add2 --task addition --digits 2 --n 500
    python eval.py --ckpt out/sft_add2 --task countdown --k 4 --n 200 --samples 8 --pass_k 1 8 --temperature 0.8
    python eval.py --ckpt out/sft_add2 --data held_out.jsonl     # exact match of the last assistant turn
    python eval.py --ckpt out/sft_add2 --task addition --digits 2 --split train --n 20000 --replies teacher.jsonl

Replies are generated in batches: each prompt rendered with the chat template up to "<|im_start|>assistant\\n"
(Tokenizer.render_chat), the batch left-padded and decoded with one KV cache; a row is done at its
<|im_end|>. The results are printed and written as JSON (--out, by default beside the checkpoint). --replies
writes the replies themselves as a conversation file: a teacher's replies to fine-tune a student on (black-box
distillation), or with --min_reward 1 only the verified ones (rejection sampling).

The one idea: pass@k, the chance that at least one of k tries is right, is estimated from n >= k samples per
problem without bias (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"). With c of the n
correct, k of them drawn without replacement miss every correct one with probability C(n-c, k) / C(n, k), so
pass@k = 1 - C(n-c, k) / C(n, k), computed as a product of ratios that never overflows. Sampling k replies and
asking whether one is right would estimate the same quantity with more variance.
"""

import argparse
import itertools
import json
import os
import sys

import torch

from checkpoint import load_model
from configurator import resolve_device
from files import atomic_write, os_error
from readers import record_text
from tasks import TASKS, add_difficulty_arguments, difficulty_of, examples, reward
from sample import left_padded
from tokenizer import EOS_ID, IM_END_ID


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples, c of them correct, include a correct one."""
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod over i of (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


@torch.no_grad()
def reply_tokens(model, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list[list[int]]:
    """The ids of each prompt's reply, generated together from left-padded prompts with one KV cache; a reply ends
    with its <|im_end|> (or </s>), kept as its last id, or after max_new_tokens without one."""
    idx, is_real = left_padded(prompts, model.wte.weight.device)
    new, done = [[] for _ in prompts], [False] * len(prompts)
    for tokens in model.generate(idx, max_new_tokens, temperature, attention_mask=is_real):
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                new[row].append(token)
                done[row] = token in (IM_END_ID, EOS_ID)
        if all(done):
            break
    return new


def replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, temperature: float,
            batch_size: int) -> list[str]:
    """The model's reply to each conversation (which ends with the turn to answer), generated batch_size at a
    time (reply_tokens), as text without its closing token."""
    out = []
    for lo in range(0, len(conversations), batch_size):
        prompts = [tokenizer.render_chat(c, generation_prompt=True)[0] for c in conversations[lo:lo + batch_size]]
        out += [reply_text(tokenizer, ids) for ids in reply_tokens(model, prompts, max_new_tokens, temperature)]
    return out


def reply_text(tokenizer, ids: list[int]) -> str:
    """A reply's text, without the <|im_end|> (or </s>) that closed it."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] in (IM_END_ID, EOS_ID) else ids)


def task_problems(args) -> list[tuple[list[dict], callable]]:
    """(conversation to answer, scorer of a reply) for --n problems of the task's held-out split."""
    stream = examples(args.task, args.split, args.seed, args.lang, **difficulty_of(args))
    return [(problem["messages"][:-1], lambda reply, problem=problem: reward(problem, reply))
            for problem in itertools.islice(stream, args.n)]


def file_problems(path: str) -> list[tuple[list[dict], callable]]:
    """(conversation up to its last assistant turn, exact match against that turn) for every line of a
    conversation file; lines that are no conversation are skipped and reported with their number."""
    problems, skipped = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"eval.py: cannot read --data {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        try:  # the checks prepare_data.py --chat makes of a line, with its messages
            messages = json.loads(record_text(line.encode(), field=None))
        except ValueError as e:
            skipped += 1
            print(f"warning: {path}:{number}: {e}, line skipped", file=sys.stderr)
            continue
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = messages[last]["content"].strip()
        problems.append((messages[:last], lambda reply, reference=reference: float(reply.strip() == reference)))
    if not problems:
        raise SystemExit(f"eval.py: {path} holds no conversation to score ({skipped} lines skipped)")
    return problems


def score(problems, answers: list[str], samples: int, pass_k: list[int]) -> dict:
    """Exact match (share of samples with reward 1), mean reward, and pass@k over the problems."""
    rewards = [problems[i // samples][1](answer) for i, answer in enumerate(answers)]
    correct = [sum(r == 1.0 for r in rewards[i:i + samples]) for i in range(0, len(rewards), samples)]
    return {"exact_match": sum(r == 1.0 for r in rewards) / len(rewards), "mean_reward": sum(rewards) / len(rewards),
            **{f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / len(correct) for k in pass_k},
            "rewards": rewards}


def write_replies(path: str, conversations: list[list[dict]], answers: list[str], rewards: list[float],
                  min_reward: float) -> int:
    """Each reply with reward >= min_reward as a line of a conversation file: its prompt's messages, the reply as
    the assistant's turn, and the reward. Fine-tuning on a teacher's replies is sequence-level (black-box)
    distillation (Kim and Rush 2016, "Sequence-Level Knowledge Distillation"): the student learns the teacher's
    answers, not its distributions, so the two need not share a tokenizer. Returns how many were written."""
    kept = [(c, a, r) for c, a, r in zip(conversations, answers, rewards) if r >= min_reward]
    with atomic_write(path, "w") as f:
        for conversation, answer, score in kept:
            line = {"messages": [*conversation, {"role": "assistant", "content": answer}], "reward": score}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(kept)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="out_dir of a training run (ckpt.pt + tokenizer.model)")
    parser.add_argument("--task", choices=TASKS, help="a task of tasks.py (its held-out split by default)")
    parser.add_argument("--data", help="instead of --task: a conversation file; exact match of each last reply")
    add_difficulty_arguments(parser)
    parser.add_argument("--n", type=int, default=500, help="problems of --task (default 500)")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--lang", choices=("en", "zh"), default="en")
    parser.add_argument("--seed", type=int, default=0, help="of the problems and of the sampling")
    parser.add_argument("--samples", type=int, default=1, help="replies per problem, the n of pass@k")
    parser.add_argument("--pass_k", type=int, nargs="+", default=[1], help="the k of pass@k (each <= --samples)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="the JSON file of results (default: <ckpt>/eval_<task or data file>.json)")
    parser.add_argument("--replies", help="also write every reply as a conversation file (JSONL), with its reward")
    parser.add_argument("--min_reward", type=float, default=0.0, help="--replies keeps only replies rewarded this much")
    args = parser.parse_args(argv)
    if (args.task is None) == (args.data is None):
        parser.error("give exactly one of --task and --data")
    for name in ("n", "samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.min_reward <= 1:
        parser.error(f"--min_reward must be between 0 and 1 (rewards are), got {args.min_reward}")
    if not 0 <= args.temperature < float("inf"):
        parser.error(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.samples > 1 and args.temperature == 0:
        parser.error("--samples above 1 needs --temperature above 0: greedy replies are all the same")
    if not all(1 <= k <= args.samples for k in args.pass_k):
        parser.error(f"every --pass_k must be between 1 and --samples ({args.samples}), got {args.pass_k}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        problems = task_problems(args) if args.task else file_problems(args.data)
    except ValueError as e:  # a difficulty that does not fit the task, a split used up
        raise SystemExit(f"eval.py: {e}") from None
    model, tokenizer = load_model(args.ckpt, resolve_device(args.device))
    torch.manual_seed(args.seed)
    conversations = [conversation for conversation, _ in problems for _ in range(args.samples)]
    answers = replies(model, tokenizer, conversations, args.max_new_tokens, args.temperature, args.batch_size)
    results = score(problems, answers, args.samples, args.pass_k)
    name = args.task or os.path.splitext(os.path.basename(args.data))[0]
    summary = {"ckpt": args.ckpt, "task": args.task, "data": args.data, "problems": len(problems),
               "samples": args.samples, "temperature": args.temperature, **{k: v for k, v in results.items()
                                                                            if k != "rewards"}}
    for key in ("exact_match", "mean_reward", *(f"pass@{k}" for k in args.pass_k)):
        print(f"{key}: {summary[key]:.4f}")
    shown = [{"prompt": conversations[i][-1]["content"], "reply": answers[i], "reward": results["rewards"][i]}
             for i in range(min(10, len(answers)))]
    path = args.out or os.path.join(args.ckpt, f"eval_{name}.json")
    try:
        with atomic_write(path, "w") as f:
            json.dump({**summary, "first_replies": shown}, f, indent=1, ensure_ascii=False)
        if args.replies:
            kept = write_replies(args.replies, conversations, answers, results["rewards"], args.min_reward)
            print(f"wrote {kept} of {len(answers)} replies to {args.replies}", file=sys.stderr)
    except OSError as e:
        raise os_error("eval.py", e) from None
    print(f"{len(problems)} problems x {args.samples} samples; results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
