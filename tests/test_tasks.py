"""tasks.py: every verifier pays exactly 1 for the generated answer and less for a wrong reply, in both languages;
the streams are the same bytes for a seed and differ across seeds; train and test never share a problem; the
countdown parser computes with the usual precedence and refuses everything else without eval; the command writes
n conversations and turns bad input into one sentence."""

import builtins
import json
import subprocess
import sys
from fractions import Fraction
from itertools import islice
from pathlib import Path

import pytest

from tasks import TASKS, evaluate, examples, reward
from tokenizer import conversation_messages

ROOT = Path(__file__).resolve().parent.parent


def take(n, task, split="train", seed=0, lang="en", **difficulty):
    return list(islice(examples(task, split, seed, lang, **difficulty), n))


def wrong_replies(example) -> list[str]:
    """Replies that are not the answer, for the example's task."""
    task, answer = example["task"], example["answer"]
    common = ["", "   ", "garbage", "I don't know"]
    if task in ("addition", "multiplication", "count"):
        n = int(answer)
        return common + [str(n + 1), str(n - 1), f"{n - 1} or {n}", f"{n}.5", f"The answer is {n + 1}"]
    if task == "sorting":
        want = sorted(example["numbers"])
        i = next(i for i in range(len(want) - 1) if want[i] != want[i + 1])  # two distinct neighbours to swap
        swapped = want[:i] + [want[i + 1], want[i]] + want[i + 2:]
        return common + [" ".join(map(str, v)) for v in (swapped, want[::-1], want[:-1], want + [want[-1]],
                                                         [want[0] + 1] + want[1:])]
    if task == "reverse":
        return common + [example["text"] if example["text"] != answer else "", answer[:-1], answer + "a",
                         answer.upper(), "z" + answer[1:] if answer[0] != "z" else "a" + answer[1:]]
    numbers = example["numbers"]  # countdown: the reference uses every number, so one more is one too many
    return common + [f"{answer} + {numbers[0]}", f"({answer}) * 1000", f"({answer}", f"{answer})",
                     f"({answer}) ** 1", f"__import__('os').system('true') + {answer}",
                     f"{answer} = {example['target']}",
                     " + ".join(map(str, numbers)) if sum(numbers) != example["target"] else "0"]


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("task", TASKS)
def test_the_answer_earns_1_and_wrong_replies_less(task, lang):
    exact = task != "sorting" and task != "countdown"
    for example in take(40, task, lang=lang):
        assert reward(example, example["answer"]) == 1.0
        assert reward(example, f"  {example['answer']}\n") == 1.0
        for reply in wrong_replies(example):
            score = reward(example, reply)
            assert 0.0 <= score < 1.0, (example, reply)
            assert score == 0.0 or not exact, (example, reply)
        assert reward(example, "") == reward(example, "garbage") == 0.0


def test_what_the_verifiers_forgive_and_what_they_credit():
    add = take(1, "addition")[0]
    assert reward(add, f"The answer is {add['answer']}.") == reward(add, f"答案是{add['answer']}") == 1.0
    assert reward(add, f"{add['a']} + {add['b']} = {add['answer']}") == 0.0  # three numbers: no single answer
    rev = take(1, "reverse")[0]
    assert reward(rev, f'The reversed string is "{rev["answer"]}".') == 1.0
    sort = {"task": "sorting", "numbers": [9, 3, 12, 5, 1]}
    assert reward(sort, "1, 3, 5, 9, 12") == 1.0
    assert reward(sort, "1 3 9 5 12") == pytest.approx(3 / 5)  # one swap: three positions of five right
    assert reward(sort, "1 3 5 9") == pytest.approx(4 / 5)
    game = {"task": "countdown", "numbers": [3, 5, 2], "target": 16}
    assert reward(game, "(3+5)*2") == reward(game, "2 * (5 + 3)") == 1.0
    assert 0.09 < reward(game, "3 * 5") < 0.1  # 15: a legal near miss earns a little by closeness
    assert reward(game, "3 * 5") > reward(game, "3 + 2") > 0.0  # 15 is nearer 16 than 5 is
    assert reward(game, "3 * 5 * 2 * 2") == 0.0  # 2 used twice


def test_a_seed_gives_the_same_bytes_and_another_seed_other_problems():
    for task in TASKS:
        first = [json.dumps(e, ensure_ascii=False) for e in take(30, task, seed=7)]
        assert first == [json.dumps(e, ensure_ascii=False) for e in take(30, task, seed=7)]
        assert first != [json.dumps(e, ensure_ascii=False) for e in take(30, task, seed=8)]
        # The language changes the words only: the same problems in English and Chinese.
        strip = [{k: v for k, v in e.items() if k != "messages"} for e in take(30, task, seed=7, lang="zh")]
        assert strip == [{k: v for k, v in json.loads(line).items() if k != "messages"} for line in first]


@pytest.mark.parametrize("task, difficulty, key", [
    ("addition", {"digits": 2}, lambda e: tuple(sorted((e["a"], e["b"])))),
    ("reverse", {"length": 2}, lambda e: e["text"]),
    ("countdown", {"k": 2}, lambda e: (tuple(sorted(e["numbers"])), e["target"])),
])
def test_train_and_test_never_share_a_problem(task, difficulty, key):
    train = {key(e) for e in take(4000, task, "train", seed=1, **difficulty)}
    test = {key(e) for e in take(1000, task, "test", seed=2, **difficulty)}
    assert len(train) > 300 and len(test) > 20
    assert not train & test


def test_unique_streams_use_up_a_small_pool_and_then_stop_with_a_sentence():
    # 1-digit addition: 100 ordered pairs, 55 problems up to order, each in exactly one split.
    found = {}
    for split in ("train", "test"):
        stream = examples("addition", split, seed=3, unique=True, digits=1)
        found[split] = []
        with pytest.raises(ValueError, match="too few exist"):
            for example in stream:
                found[split].append(tuple(sorted((example["a"], example["b"]))))
    assert len(set(found["train"])) == len(found["train"]) and len(set(found["test"])) == len(found["test"])
    assert set(found["train"]) | set(found["test"]) == {(a, b) for a in range(10) for b in range(a, 10)}
    assert 1 <= len(found["test"]) <= 15 and not set(found["train"]) & set(found["test"])


@pytest.mark.parametrize("kwargs", [dict(digits=0), dict(digits=101), dict(k=3), dict(seed=-1), dict(split="val"),
                                    dict(lang="fr"), dict(task="division")])
def test_bad_arguments_are_refused_at_the_call(kwargs):
    with pytest.raises(ValueError):
        examples(**{"task": "addition", **kwargs})  # no next(): the check is not deferred to the first example


def test_the_countdown_parser_follows_precedence_and_refuses_everything_else(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert evaluate("2 + 3 * 4", [2, 3, 4]) == 14
    assert evaluate("(2 + 3) * 4", [4, 3, 2]) == 20
    assert evaluate("10 - 4 - 3", [10, 4, 3]) == 3 and evaluate("24 / 4 / 2", [24, 4, 2]) == 3  # left to right
    assert evaluate("7 / 2", [7, 2]) == Fraction(7, 2)  # exact, not 3.5 in floating point nor 3
    assert evaluate(" 2*(3+4)-5/(1+4) ", [1, 2, 3, 4, 4, 5]) == 13
    assert evaluate("((7))", [7]) == 7 and evaluate("3 + 3", [3, 3]) == 6  # a number given twice may be used twice
    refused = ["x + 1", "__import__('os')", "2 ** 3", "(2 + 3", "2 + 3)", "2 3", "", "2 +", "-2 + 3", "2.5",
               "abs(2)", "1e3", "2 + 2", "5", "3 // 2", "(" * 5000 + "2" + ")" * 5000]
    for text in refused:
        with pytest.raises(ValueError):
            evaluate(text, [2, 3])
    with pytest.raises(ValueError, match="division by zero"):
        evaluate("4 / (2 - 2)", [4, 2, 2])
    game = take(1, "countdown")[0]
    assert reward(game, game["answer"]) == 1.0  # the verifier runs without eval too


def run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "tasks.py"), *args], cwd=cwd, capture_output=True, text=True)


def test_the_command_writes_n_conversations(tmp_path):
    for i, (task, (_, _, (knob, *_))) in enumerate(TASKS.items()):
        lang = ("en", "zh")[i % 2]
        result = run("--task", task, f"--{knob}", "3", "--n", "25", "--lang", lang, "--seed", "5",
                     "--out", f"{task}.jsonl", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"wrote 25 {task} train examples" in result.stderr
        lines = (tmp_path / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 25
        for line in lines:
            example = json.loads(line)
            messages = conversation_messages(example)  # what the fine-tuning reader accepts
            assert [m["role"] for m in messages] == ["user", "assistant"]
            assert all(isinstance(m["content"], str) and m["content"] for m in messages)
            assert messages[1]["content"] == example["answer"] and reward(example, example["answer"]) == 1.0
        assert lines == [json.dumps(e, ensure_ascii=False) for e in take(25, task, "train", 5, lang, **{knob: 3})]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{task}.jsonl" for task in TASKS)  # no temporaries


@pytest.mark.parametrize("args, message", [
    (["--task", "addition", "--digits", "0", "--n", "5"], "--digits must be a whole number from 1 to 100"),
    (["--task", "addition", "--n", "0"], "--n must be at least 1"),
    (["--task", "addition", "--k", "3", "--n", "5"], "--k does not apply to addition"),
    (["--task", "countdown", "--k", "9", "--n", "5"], "--k must be a whole number from 2 to 8"),
    (["--task", "division", "--n", "5"], "invalid choice"),
    (["--task", "addition", "--n", "five"], "invalid int value"),
    (["--task", "addition", "--n", "5", "--seed", "-1"], "seed must be a whole number >= 0"),
    (["--task", "addition", "--digits", "1", "--n", "100", "--split", "test", "--unique"], "too few exist"),
])
def test_the_command_refuses_bad_arguments_in_a_sentence(tmp_path, args, message):
    result = run(*args, "--out", "out.jsonl", cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


@pytest.mark.parametrize("out, message", [("file/out.jsonl", "Not a directory"), ("folder", "Is a directory")])
def test_an_out_that_cannot_be_written_is_one_sentence(tmp_path, out, message):
    (tmp_path / "file").write_text("keep")
    (tmp_path / "folder").mkdir()
    result = run("--task", "reverse", "--n", "10", "--out", out, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert (tmp_path / "file").read_text() == "keep"
    assert list((tmp_path / "folder").iterdir()) == []


def test_pairs_prefer_a_right_reply_to_a_wrong_one_and_take_the_models_own_where_it_has_them(tmp_path):
    # A model's samples as eval.py --replies writes them: for the first problem one right and two wrong replies,
    # for the second only a wrong one, for the rest none.
    problems = take(5, "addition", "train", 0, digits=2)
    samples = [(problems[0], problems[0]["answer"], 1.0), (problems[0], "17", 0.0), (problems[0], "about 5", 0.0),
               (problems[1], "3", 0.0)]
    with open(tmp_path / "samples.jsonl", "w") as f:
        for problem, reply, score in samples:
            f.write(json.dumps({"messages": [*problem["messages"][:-1], {"role": "assistant", "content": reply}],
                                "reward": score}) + "\n")
    for task, (_, _, (knob, *_)) in TASKS.items():  # without samples: every task's answer can be corrupted
        result = run("--task", task, f"--{knob}", "3", "--n", "20", "--pairs", "--out", f"{task}.jsonl", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        for line in (tmp_path / f"{task}.jsonl").read_text().splitlines():
            pair = json.loads(line)
            example = {**pair, "messages": pair["prompt"]}
            assert reward(example, pair["chosen"][0]["content"]) == 1.0
            assert reward(example, pair["rejected"][0]["content"]) < 1.0
    result = run("--task", "addition", "--n", "5", "--pairs", "samples.jsonl", "--out", "pairs.jsonl", cwd=tmp_path)
    assert result.returncode == 0 and "the model's own replies: 1 chosen, 2 rejected" in result.stderr
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == [p["messages"][:-1] for p in problems]
    assert pairs[0]["rejected"][0]["content"] in ("17", "about 5") and pairs[1]["rejected"][0]["content"] == "3"
    assert all(p["chosen"][0]["content"] == problem["answer"] for p, problem in zip(pairs, problems))
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    result = run("--task", "addition", "--n", "5", "--pairs", "bad.jsonl", "--out", "x.jsonl", cwd=tmp_path)
    assert result.returncode != 0 and "bad.jsonl:1 is not a line of eval.py --replies" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()
