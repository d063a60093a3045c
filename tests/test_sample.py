"""sample.py: what it prints is what the model predicts, and bad input gets one clear sentence."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model
from model import beam_search
from sample import main as sample_main
from tokenizer import EOS_ID, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_greedy_output_is_the_argmax_continuation(trained_ckpt):
    prompt, n = "def add(a, b):\n", 20
    result = sample("--ckpt", trained_ckpt, "--prompt", prompt, "--temperature", "0", "--max_new_tokens", str(n))
    assert result.returncode == 0, result.stderr
    # The reference: full forward passes without a cache, taking the argmax each time.
    model, tokenizer = load_model(trained_ckpt, "cpu")
    ids = tokenizer.encode(prompt)
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + new]))
            token = logits[0, -1].argmax().item()
            if token == EOS_ID:
                break
            new.append(token)
    assert result.stdout == prompt + tokenizer.decode(new) + "\n"
    assert "tokens/s" in result.stderr


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(trained_ckpt, tmp_path):
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text("x = 1\n" * 500)
    result = sample("--ckpt", trained_ckpt, "--prompt_file", str(prompt_file), "--max_new_tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "keeping the last" in result.stderr


def refused(*args) -> str:
    """sample.py's main in this process (a process each would cost seconds of imports): its one sentence."""
    with pytest.raises(SystemExit) as e:
        sample_main(list(args))
    return str(e.value.code)


def test_bad_inputs_are_one_clear_sentence(trained_ckpt, tmp_path, capsys):
    result = sample("--ckpt", str(tmp_path / "nowhere"))  # once through the command line: exit 1, no traceback
    assert result.returncode == 1 and "ckpt.pt not found" in result.stderr and "Traceback" not in result.stderr
    # A checkpoint whose weights belong to another model shape.
    other = tmp_path / "other"
    other.mkdir()
    checkpoint = torch.load(os.path.join(trained_ckpt, "ckpt.pt"), weights_only=True)
    checkpoint["model_config"]["n_layer"] += 1
    torch.save(checkpoint, other / "ckpt.pt")
    (other / "tokenizer.model").write_bytes(open(os.path.join(trained_ckpt, "tokenizer.model"), "rb").read())
    assert "is not a checkpoint of this model code" in refused("--ckpt", str(other))
    (other / "ckpt.pt").write_bytes(b"torn")
    assert "cannot read" in refused("--ckpt", str(other))
    assert "cannot read --prompt_file" in refused("--ckpt", trained_ckpt, "--prompt_file", str(tmp_path / "missing.txt"))
    for args, message in ((["--top_p", "1.5"], "--top_p must be in (0, 1]"),
                          (["--temperature", "nan"], "--temperature must be a number >= 0"),
                          (["--temperature", "inf"], "--temperature must be a number >= 0"),
                          (["--top_p", "nan"], "--top_p must be in (0, 1]"),
                          (["--seed", str(2**70)], "--seed must be between 0 and 2**63 - 1")):
        assert refused("--ckpt", trained_ckpt, *args) == "2" and message in capsys.readouterr().err, args
    (other / "ckpt.pt").write_bytes(b"")  # an empty file once crashed the error message itself
    assert "cannot read" in refused("--ckpt", str(other))
    if not torch.cuda.is_available():
        assert "has no CUDA GPU" in refused("--ckpt", trained_ckpt, "--device", "cuda")


def test_a_tokenizer_other_than_the_checkpoints_is_refused(trained_ckpt, tmp_path):
    # Another tokenizer of exactly the same size: only its content differs, and the stored hash tells.
    other = tmp_path / "other"
    shutil.copytree(trained_ckpt, other)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(ROOT, "README.md")).read())
    vocab = load_model(trained_ckpt, "cpu")[1].vocab_size
    subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), "--input", str(corpus), "--vocab_size", str(vocab),
            "--out", str(tmp_path / "tok")], check=True, capture_output=True)
    assert Tokenizer(str(tmp_path / "tok" / "tokenizer.model")).vocab_size == vocab
    shutil.copy(tmp_path / "tok" / "tokenizer.model", other / "tokenizer.model")
    result = sample("--ckpt", str(other), "--max_new_tokens", "3")
    assert result.returncode == 1 and "is not the tokenizer" in result.stderr and "Traceback" not in result.stderr


class CharTokenizer:
    """One character per id: TextStream's decoding without a model."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_a_stop_string_ends_the_text_before_it_and_nothing_of_it_is_ever_printed():
    import io

    from sample import TextStream

    out = io.StringIO()
    stream = TextStream(CharTokenizer(), out, stop=["END", "\n\n"])
    printed = []
    for ch in "ab\nEN?cdE":  # "EN" could start "END" and waits; "?" shows it did not
        assert not stream.add(ord(ch))
        printed.append(out.getvalue())
    # What might begin a stop string waits until it cannot: "\n" (of "\n\n"), then "EN" (of "END").
    assert printed[1:6] == ["ab", "ab", "ab\n", "ab\n", "ab\nEN?"]
    assert stream.add(ord("N")) is False and stream.add(ord("D")) is True  # "...cdEND": stopped
    assert stream.finish() == "ab\nEN?cd" and out.getvalue() == "ab\nEN?cd"


def test_stop_strings_beam_search_and_the_new_options_from_the_command_line(trained_ckpt):
    prompt = "def add(a, b):\n"
    model, tokenizer = load_model(trained_ckpt, "cpu")
    ids = torch.tensor([tokenizer.encode(prompt)])
    # The tiny model's greedy continuation is newlines; the penalty makes it write something to stop in.
    greedy = tokenizer.decode(torch.cat(list(model.generate(ids, 30, temperature=0, repetition_penalty=2.0,
                                                            stop_ids=[EOS_ID]))).tolist())
    stop = next(greedy[i:i + 2] for i in range(len(greedy) // 2, len(greedy)) if greedy[i:i + 2].isalnum())
    result = sample("--ckpt", trained_ckpt, "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "30",
                    "--repetition_penalty", "2", "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + greedy[:greedy.index(stop)] + "\n"
    best = beam_search(model, ids, 30, 3, [EOS_ID])[0]
    result = sample("--ckpt", trained_ckpt, "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "30",
                    "--num_beams", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + tokenizer.decode([t for t in best if t != EOS_ID]) + "\n"
    for args, message in ((["--num_beams", "3"], "pass --temperature 0"),
                          (["--repetition_penalty", "0"], "--repetition_penalty must be a number > 0"),
                          (["--min_new_tokens", "300"], "--min_new_tokens must be between 0 and --max_new_tokens"),
                          (["--stop", ""], "--stop needs a non-empty string")):
        result = sample("--ckpt", trained_ckpt, *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, args


def test_a_prompts_file_is_one_left_padded_batch_that_continues_each_line_as_alone(trained_ckpt, tmp_path, capsys):
    prompts = ["def add(a, b):", "class Parser:", "", "import os"]  # different lengths; "" starts a document
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")

    def printed(*args):  # sample.py's main in this process: what it prints
        capsys.readouterr()
        sample_main(list(args))
        return capsys.readouterr().out

    for options in (["--repetition_penalty", "2"], ["--num_beams", "3"]):
        common = ["--ckpt", trained_ckpt, "--temperature", "0", "--max_new_tokens", "12", *options]
        batch = printed(*common, "--prompts_file", str(tmp_path / "prompts.txt"))
        alone = [printed(*common, "--prompt", prompt) for prompt in prompts]
        assert batch == "".join(f"---------- prompt {i + 1} ----------\n{text}" for i, text in enumerate(alone))
    assert refused("--ckpt", trained_ckpt, "--prompts_file", str(tmp_path / "prompts.txt"), "--num_samples", "2") == "2"
    assert "--prompts_file gives the prompts" in capsys.readouterr().err
    assert "cannot read --prompts_file" in refused("--ckpt", trained_ckpt, "--prompts_file", str(tmp_path / "missing.txt"))


def test_speculative_decoding_prints_the_greedy_text_and_its_acceptance(prepared_data, trained_ckpt, tmp_path):
    # A tiny model trained with one MTP module (train.py logs the module's cross-entropy, which must fall): its
    # self-speculative greedy text is the plain greedy text, and the acceptance rate is printed.
    out = tmp_path / "mtp"
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={prepared_data}", f"--out_dir={out}",
                    "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
                    "--max_iters=60", "--eval_interval=60", "--eval_iters=2", "--warmup_iters=5",
                    "--lr_decay_iters=60", "--learning_rate=3e-3", "--mtp_depth=1", "--log_interval=1"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    with open(out / "metrics.jsonl") as f:
        mtp = [r["mtp_loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(mtp) == 60 and sum(mtp[-5:]) < sum(mtp[:5]) - 5 * 1.0, mtp
    common = ["--ckpt", str(out), "--prompt", "def __init__(self", "--temperature", "0", "--max_new_tokens", "40"]
    plain, speculative = sample(*common), sample(*common, "--speculative")
    assert plain.returncode == 0 and speculative.returncode == 0, speculative.stderr
    assert speculative.stdout == plain.stdout and len(plain.stdout) > len("def __init__(self") + 10
    accepted = [line for line in speculative.stderr.splitlines() if line.startswith("speculative: ")]
    assert len(accepted) == 1 and " drafts accepted (" in accepted[0], speculative.stderr
    refusal = sample("--ckpt", trained_ckpt, "--prompt", "x", "--temperature", "0", "--speculative")
    assert refusal.returncode == 1 and "has none (mtp_depth = 0)" in refusal.stderr and "Traceback" not in refusal.stderr
    refusal = sample(*common[:4], "--speculative")  # sampling at sample.py's default temperature
    assert refusal.returncode == 2 and "--speculative decodes one prompt greedily" in refusal.stderr
