"""
tasks.py: verifiable tasks for fine-tuning and for reinforcement learning on verifiable rewards: seeded,
endless streams of conversations whose answer a program can check, each with a difficulty knob.

    python tasks.py --task addition --digits 2 --n 20000 --split train --out add2_train.jsonl
    python tasks.py --task countdown --k 4 --n 500 --split test --unique --lang zh --out countdown4_test.jsonl
    python tasks.py --task reverse --length 6 --n 4000 --pairs samples.jsonl --out reverse_pairs.jsonl  # for DPO

    for example in examples("countdown", "train", seed=0, k=4): ...     # endless
    reward(example, "(3 + 5) * 2")                                       # 1.0 when it makes the target

The one idea: train and test are disjoint by construction. Every problem has a canonical key (its numbers
or its string, ordered so that 3 + 5 and 5 + 3 are one problem), and a fixed hash of that key (sha256, not
Python's hash(), which is salted anew in every process) puts 1 problem in TEST_EVERY in "test" and the rest
in "train". A generator draws problems at random and skips those of the other split, so no seed, no n and no
later run can put a test problem into training data, and neither set has to be stored to stay apart.

A line of the output is one example: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}],
"task": ..., "answer": ..., and the fields its verifier reads}; the assistant's content is the bare answer,
so a model fine-tuned on it answers just that. Problems are drawn independently, so a small pool repeats
(1-digit addition has 100 problems, 55 up to order); --unique writes each problem at most once and stops with
a sentence when the split has no more. The language changes only the words: a seed gives the same problems
in English and in Chinese.
"""

import argparse
import hashlib
import itertools
import json
import operator
import random
import re
import string
import sys
from collections import Counter
from fractions import Fraction

from files import atomic_write, os_error

TEST_EVERY = 10  # 1 problem in 10 is a test problem
SPLITS = ("train", "test")
# After this many draws in a row that bring no usable problem (all of the other split, or with --unique all
# seen), the split is taken as used up. In a pool small enough to run out (each problem drawn with a chance of
# 1 in 10,000 or more) a remaining problem is missed that often with odds below e^-10; in a larger pool this
# stops only near the pool's end, where a new problem is about as rare.
MAX_MISSES = 100_000
LETTERS = string.ascii_lowercase
NUMBER = re.compile(r"-?\d+")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}  # exact on Fractions
COUNTDOWN_LARGEST = 25  # countdown's numbers are 1..25
COUNTDOWN_PRODUCT = 1000  # a product above this is not built, so targets stay at about three digits


# -- Generators: each draws one problem and returns its fields (with the reference "answer") and its key.

def n_digit(rng: random.Random, digits: int) -> int:
    """A number of exactly `digits` digits; 0 counts as a 1-digit number, so 1-digit problems use 0..9."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def addition(rng, digits):
    a, b = n_digit(rng, digits), n_digit(rng, digits)
    return {"a": a, "b": b, "answer": str(a + b)}, sorted([a, b])


def multiplication(rng, digits):
    a, b = n_digit(rng, digits), n_digit(rng, digits)
    return {"a": a, "b": b, "answer": str(a * b)}, sorted([a, b])


def sorting(rng, k):
    numbers = [rng.randint(0, 999) for _ in range(k)]
    return {"numbers": numbers, "answer": " ".join(map(str, sorted(numbers)))}, sorted(numbers)


def reverse(rng, length):
    text = "".join(rng.choices(LETTERS, k=length))
    return {"text": text, "answer": text[::-1]}, text


def count(rng, length):
    text = "".join(rng.choices(LETTERS, k=length))
    # Mostly a letter the string holds, sometimes any letter, so that 0 is an answer the model meets too.
    letter = rng.choice(text) if rng.random() < 0.8 else rng.choice(LETTERS)
    return {"text": text, "letter": letter, "answer": str(text.count(letter))}, [text, letter]


def countdown(rng, k):
    """Combine the k numbers two at a time into one random expression; its value is the target, so a solution
    always exists, and the expression is the reference answer. Every intermediate result is a positive integer
    (the TV game's rule), and each operand is parenthesised only where precedence needs it."""
    numbers = [rng.randint(1, COUNTDOWN_LARGEST) for _ in range(k)]
    nodes = [(Fraction(n), str(n), 3) for n in numbers]  # (value, text, precedence: 3 for a number)
    while len(nodes) > 1:
        (a, left, left_prec), (b, right, right_prec) = (nodes.pop(rng.randrange(len(nodes))) for _ in range(2))
        allowed = {"+": True, "-": a > b, "*": a * b <= COUNTDOWN_PRODUCT, "/": b > 1 and a % b == 0}
        op = rng.choice([op for op, ok in allowed.items() if ok])
        prec = 1 if op in "+-" else 2
        left = f"({left})" if left_prec < prec else left
        # a - (b + c) and a / (b * c) keep their parentheses; a + (b - c) and a * (b / c) have the same value without.
        right = f"({right})" if right_prec < prec or (right_prec == prec and op in "-/") else right
        nodes.append((OPS[op](a, b), f"{left} {op} {right}", prec))
    target, answer, _ = nodes[0]
    return {"numbers": numbers, "target": int(target), "answer": answer}, [sorted(numbers), int(target)]


# -- Verifiers: reward(example, reply) in [0, 1]; surrounding whitespace never matters.

def number_reward(example, reply: str) -> float:
    """Addition, multiplication, count: exact only, since a near miss in arithmetic or counting is simply wrong.
    Words around the number are forgiven ("The answer is 57", "答案是57"), but the reply must hold exactly one
    number, so hedging ("56 or 57") or shown working ("12 + 45 = 57") earns nothing."""
    numbers = NUMBER.findall(reply)
    return float(len(numbers) == 1 and int(numbers[0]) == int(example["answer"]))


def sorting_reward(example, reply: str) -> float:
    """The fraction of positions right, over the longer of reply and answer: a list with one pair swapped is
    mostly sorted and earns most of the reward, a dropped or invented number shifts or lengthens the list and
    costs its share. Words are ignored; the reply's numbers in order are the list."""
    got, want = [int(n) for n in NUMBER.findall(reply)], sorted(example["numbers"])
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))


def reverse_reward(example, reply: str) -> float:
    """The reply's last word (run of letters a-z) must be the reversed string: "The reversed string is olleh."
    counts. Exact only: credit per position would pay an unreversed echo for every letter the string shares
    with its mirror image."""
    return float(re.findall(r"[a-z]+", reply)[-1:] == [example["answer"]])


def countdown_reward(example, reply: str) -> float:
    """1 when the reply, an expression alone (no words, no '= 16'), makes the target. A legal expression over
    the given numbers that misses earns up to 0.1 by closeness: enough that a model learning the format prefers
    legal expressions that come near, too little to be worth settling for a near miss. Anything that is not a
    legal expression (a name, a number not given or used twice, division by zero) earns 0."""
    try:
        value = evaluate(reply, example["numbers"])
    except ValueError:
        return 0.0
    target = example["target"]
    return 1.0 if value == target else 0.1 * max(0.0, 1 - float(abs(value - target)) / target)


def evaluate(text: str, numbers: list[int]) -> Fraction:
    """The exact value of an arithmetic expression that uses each of `numbers` at most once, by recursive
    descent, never eval: integers, + - * /, parentheses, * and / binding tighter, left to right. ValueError for
    anything else: a name, a unary minus, '**', unbalanced parentheses, a number not given or used once too
    often, division by zero."""
    tokens = re.findall(r"\d+|\S", text)[::-1]  # a stack: pop() takes the next token
    unused = Counter(numbers)

    def expression():  # term (("+" | "-") term)*
        value = term()
        while tokens and tokens[-1] in ("+", "-"):
            value = OPS[tokens.pop()](value, term())
        return value

    def term():  # factor (("*" | "/") factor)*
        value = factor()
        while tokens and tokens[-1] in ("*", "/"):
            op, right = tokens.pop(), factor()
            if op == "/" and right == 0:
                raise ValueError("division by zero")
            value = OPS[op](value, right)
        return value

    def factor():  # number | "(" expression ")"
        token = tokens.pop() if tokens else "the end"
        if token == "(":
            value = expression()
            if not tokens or tokens.pop() != ")":
                raise ValueError("unbalanced parentheses")
            return value
        if not token.isdecimal():
            raise ValueError(f"expected a number or '(', found {token!r}")
        if unused[int(token)] == 0:
            raise ValueError(f"{token} is not one of the numbers left")
        unused[int(token)] -= 1
        return Fraction(int(token))

    try:
        value = expression()
    except RecursionError:  # thousands of nested parentheses
        raise ValueError("nested too deeply") from None
    if tokens:
        raise ValueError(f"unexpected {tokens[-1]!r}")
    return value


# -- The six tasks: generator, verifier, difficulty knob (name, default, smallest, largest), prompts.
# The largest values are sanity bounds (past them a line is absurdly long), not limits of the code.

TASKS = {
    "addition": (addition, number_reward, ("digits", 2, 1, 100)),
    "multiplication": (multiplication, number_reward, ("digits", 2, 1, 100)),
    "sorting": (sorting, sorting_reward, ("k", 5, 2, 100)),
    "reverse": (reverse, reverse_reward, ("length", 6, 1, 1000)),
    "count": (count, number_reward, ("length", 10, 1, 1000)),
    "countdown": (countdown, countdown_reward, ("k", 4, 2, 8)),
}
KNOBS = ("digits", "k", "length")
PROMPTS = {
    "addition": {"en": "What is {a} + {b}? Reply with the number only.",
                 "zh": "{a} + {b} 等于多少？只回答这个数。"},
    "multiplication": {"en": "What is {a} * {b}? Reply with the number only.",
                       "zh": "{a} × {b} 等于多少？只回答这个数。"},
    "sorting": {"en": "Sort these numbers in ascending order: {numbers}. Reply with the sorted numbers "
                      "separated by spaces.",
                "zh": "把这些数按从小到大的顺序排列：{numbers}。只回答排好的数，用空格隔开。"},
    "reverse": {"en": 'Reverse the string "{text}". Reply with the reversed string only.',
                "zh": "把字符串“{text}”倒过来写。只回答倒过来的字符串。"},
    "count": {"en": 'How many times does the letter "{letter}" appear in "{text}"? Reply with the number only.',
              "zh": "字母“{letter}”在“{text}”中出现了几次？只回答这个数。"},
    "countdown": {"en": "Use the numbers {numbers} to make {target}, each number at most once, with + - * / and "
                        "parentheses. Reply with the expression only.",
                  "zh": "用 {numbers} 这几个数算出 {target}，每个数最多用一次，可以用 + - * / 和括号。只回答算式。"},
}
LANGS = ("en", "zh")


def split_of(key: str) -> str:
    """'test' for 1 problem key in TEST_EVERY, chosen by a fixed hash, 'train' for the rest."""
    digest = hashlib.sha256(key.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_EVERY == 0 else "train"


def reward(example: dict, reply: str) -> float:
    """How right a model's reply to the example is, in [0, 1]: 1 for the reference answer (see each verifier)."""
    return TASKS[example["task"]][1](example, reply)


def examples(task: str, split: str = "train", seed: int = 0, lang: str = "en", unique: bool = False, **difficulty):
    """The examples of one task and split, endless (with unique=True, until the split has no unseen problem:
    then ValueError). difficulty is the task's one knob, e.g. digits=3; the same arguments give the same
    examples. The arguments are checked here, at the call, not at the first next()."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")
    make, _, (knob, default, lo, hi) = TASKS[task]
    value = difficulty.pop(knob, default)
    if difficulty:
        raise ValueError(f"--{next(iter(difficulty))} does not apply to {task}, whose difficulty is --{knob}")
    if not (isinstance(value, int) and lo <= value <= hi):
        raise ValueError(f"--{knob} must be a whole number from {lo} to {hi} for {task}, got {value}")
    if split not in SPLITS or lang not in LANGS:
        raise ValueError(f"split must be one of {SPLITS} and lang one of {LANGS}, got {split!r} and {lang!r}")
    if not (isinstance(seed, int) and seed >= 0):  # random.Random(-s) is random.Random(s)
        raise ValueError(f"seed must be a whole number >= 0, got {seed}")
    return generate(task, lambda rng: make(rng, value), split, random.Random(seed), PROMPTS[task][lang], unique)


def generate(task, make, split, rng, prompt, unique):
    """The stream behind examples(): draw, keep what belongs to the split, dress it as a conversation."""
    seen, misses = set(), 0
    while True:
        fields, key = make(rng)
        key = json.dumps([task, key])
        if split_of(key) != split or (unique and key in seen):
            misses += 1
            if misses == MAX_MISSES:
                found = f" ({len(seen)} found)" if unique else ""
                raise ValueError(f"{MAX_MISSES:,} draws in a row brought no {'new ' if unique else ''}{split} "
                                 f"{task} problem{found}: too few exist at this difficulty; ask for fewer or "
                                 "make them harder")
            continue
        misses = 0
        if unique:
            seen.add(key)
        shown = {name: ", ".join(map(str, v)) if isinstance(v, list) else v for name, v in fields.items()}
        yield {"messages": [{"role": "user", "content": prompt.format(**shown)},
                            {"role": "assistant", "content": fields["answer"]}],
               "task": task, "answer": fields["answer"], **fields}


def corrupted_answer(example: dict, rng: random.Random) -> str:
    """A wrong reply made from the reference answer: one digit replaced by another digit, or one letter by
    another letter, so that it looks like an answer (the format is right, the content is not); checked wrong by
    the task's verifier."""
    answer = example["answer"]
    for _ in range(1000):
        i = rng.randrange(len(answer))
        kind = string.digits if answer[i].isdigit() else LETTERS if answer[i] in LETTERS else ""
        if kind:
            text = answer[:i] + rng.choice(kind.replace(answer[i], "")) + answer[i + 1:]
            if reward(example, text) < 1:
                return text
    raise ValueError(f"no corruption of the answer {answer!r} is wrong")


def read_samples(path: str) -> dict[str, list[tuple[str, float]]]:
    """A model's replies and their rewards, as eval.py --replies writes them, by prompt (its messages as JSON)."""
    replies = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    *prompt, reply = record["messages"]
                    replies.setdefault(json.dumps(prompt), []).append((reply["content"], float(record["reward"])))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{lineno} is not a line of eval.py --replies (messages and reward)")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --pairs {path}: {e}") from None
    return replies


def preference_pair(example: dict, samples: dict, rng: random.Random) -> tuple[dict, str, str]:
    """DPO's pair for one example, in TRL's shape: chosen = one of the model's own right replies (on-policy, what
    it would write anyway), else the reference answer; rejected = one of its wrong replies, else a corrupted answer.
    Returns (the pair, whether chosen is the model's, whether rejected is)."""
    prompt = example["messages"][:-1]
    replies = samples.get(json.dumps(prompt), [])
    right = [text for text, r in replies if r == 1]
    wrong = [text for text, r in replies if r < 1]
    chosen = rng.choice(right) if right else example["answer"]
    rejected = rng.choice(wrong) if wrong else corrupted_answer(example, rng)
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            **{k: v for k, v in example.items() if k != "messages"}}  # the fields its verifier reads
    return pair, bool(right), bool(wrong)


def add_difficulty_arguments(parser: argparse.ArgumentParser) -> None:
    """--digits, --k, --length: each task's difficulty knob (tasks.py and eval.py take the same flags)."""
    for knob in KNOBS:
        users = [(task, default) for task, (_, _, (name, default, _, _)) in TASKS.items() if name == knob]
        parser.add_argument(f"--{knob}", type=int, help=", ".join(f"{task} (default {d})" for task, d in users))


def difficulty_of(args) -> dict:
    """The knobs given on the command line, for examples(**difficulty)."""
    return {knob: getattr(args, knob) for knob in KNOBS if getattr(args, knob) is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--n", type=int, required=True, help="how many examples (lines) to write")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lang", choices=LANGS, default="en")
    parser.add_argument("--unique", action="store_true", help="each problem at most once")
    parser.add_argument("--pairs", nargs="?", const="", metavar="SAMPLES",
                        help="write DPO preference pairs instead (preference_pair), with a model's replies to the "
                        "same problems from SAMPLES (eval.py --replies, same --split, --seed and difficulty); "
                        "without SAMPLES every rejected reply is a corrupted answer")
    add_difficulty_arguments(parser)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    difficulty = difficulty_of(args)
    prompts, sources = set(), Counter()
    try:
        samples = read_samples(args.pairs) if args.pairs else {}
        stream = examples(args.task, args.split, args.seed, args.lang, args.unique, **difficulty)
        rng = random.Random(args.seed)
        with atomic_write(args.out, "w") as f:
            for example in itertools.islice(stream, args.n):
                prompts.add(example["messages"][0]["content"])
                if args.pairs is not None:
                    example, *from_model = preference_pair(example, samples, rng)
                    sources.update(side for side, mine in zip(("chosen", "rejected"), from_model) if mine)
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # an --out under a regular file, an existing folder, a read-only folder, a full disk
        raise os_error("tasks.py", e) from None
    what = "pairs" if args.pairs is not None else "examples"
    counts = (f"; the model's own replies: {sources['chosen']} chosen, {sources['rejected']} rejected"
              if args.pairs is not None else "")
    print(f"wrote {args.n} {args.task} {args.split} {what} ({len(prompts)} distinct prompts{counts}) to {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
