"""chat.py: each reply is what the model predicts after the whole conversation, and bad input gets one sentence."""

import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import chat
import engine
from checkpoint import load_model
from tokenizer import EOS_ID, IM_END_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6  # tokens per reply: the tiny model's context is 64 tokens, and the reference below has no sliding window


def run_chat(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120)


def greedy_reply(model, tokenizer, messages, n):
    """The reference: full forward passes without a cache, the argmax each time, until a turn or text ends."""
    ids = tokenizer.render_chat(messages, generation_prompt=True)[0]
    assert len(ids) + n <= model.config.block_size, "the conversation must fit the context, unslid"
    new = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids + new]))
            token = logits[0, -1].argmax().item()
            if token in (IM_END_ID, EOS_ID):
                break
            new.append(token)
    return tokenizer.decode(new)


def test_prompt_prints_the_greedy_reply_alone(trained_ckpt):
    result = run_chat("--ckpt", trained_ckpt, "--prompt", "What is 2 + 3?", "--temperature", "0",
                      "--max_new_tokens", "20")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_model(trained_ckpt, "cpu")
    expected = greedy_reply(model, tokenizer, [{"role": "user", "content": "What is 2 + 3?"}], 20)
    assert expected and result.stdout == expected + "\n"


def test_each_turn_continues_the_history_and_reset_keeps_the_system_message(trained_ckpt):
    system = {"role": "system", "content": "terse"}
    user = [{"role": "user", "content": text} for text in ("hi", "ok", "new")]
    stdin = "hi\n\nok\n/reset\nnew\n"  # the empty line is ignored; EOF ends the session
    result = run_chat("--ckpt", trained_ckpt, "--system", "terse", "--temperature", "0",
                      "--max_new_tokens", str(N), stdin=stdin)
    assert result.returncode == 0, result.stderr
    model, tokenizer = load_model(trained_ckpt, "cpu")
    reply1 = greedy_reply(model, tokenizer, [system, user[0]], N)
    reply2 = greedy_reply(model, tokenizer, [system, user[0], {"role": "assistant", "content": reply1}, user[1]], N)
    reply3 = greedy_reply(model, tokenizer, [system, user[2]], N)
    # input() writes its "> " to stdout too: one per line read, and a newline after EOF.
    assert result.stdout == f"> {reply1}\n> > {reply2}\n> > {reply3}\n> \n"
    assert "(history cleared)" in result.stderr and "Traceback" not in result.stderr


def test_the_model_reads_the_whole_history_and_ctrl_c_keeps_what_was_printed(trained_ckpt, monkeypatch, capsys):
    prefill, add, prompts = engine.Engine.prefill, engine.Choice.add, []

    def recorded(self, request, free):
        prompts.append(list(request.prompt))
        return prefill(self, request, free)

    def interrupted_once(self, token):
        if len(prompts) == 1 and self.n_new == 3:
            raise KeyboardInterrupt  # as if Ctrl-C came during the first reply's fourth token
        return add(self, token)

    lines = iter(["hi", "ok", "/reset", "new"])

    def typed(prompt):  # input() as a terminal gives it; Ctrl-C after the last line
        sys.stdout.write(prompt)
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr(engine.Engine, "prefill", recorded)
    monkeypatch.setattr(engine.Choice, "add", interrupted_once)
    monkeypatch.setattr("builtins.input", typed)
    chat.main(["--ckpt", trained_ckpt, "--system", "terse", "--temperature", "0", "--max_new_tokens", str(N)])
    model, tokenizer = load_model(trained_ckpt, "cpu")
    system = {"role": "system", "content": "terse"}
    user = [{"role": "user", "content": text} for text in ("hi", "ok", "new")]
    partial = greedy_reply(model, tokenizer, [system, user[0]], 3)
    history = [[system, user[0]], [system, user[0], {"role": "assistant", "content": partial}, user[1]],
               [system, user[2]]]
    assert prompts == [tokenizer.render_chat(h, generation_prompt=True)[0] for h in history]
    replies = [greedy_reply(model, tokenizer, h, N) for h in history[1:]]
    assert capsys.readouterr().out == f"> {partial}\n> {replies[0]}\n> > {replies[1]}\n> \n"


def test_reply_stops_at_im_end_and_prints_whole_characters_only(trained_ckpt, monkeypatch):
    model, tokenizer = load_model(trained_ckpt, "cpu")
    text = "é日本"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text), "the characters should need byte-fallback pieces"
    script = ids + [IM_END_ID] + tokenizer.encode("never")
    tokens = iter(script)
    monkeypatch.setattr(engine.Choice, "pick", lambda self, logits: next(tokens))

    class Out(io.StringIO):
        pieces = []

        def write(self, s):
            self.pieces.append(s)
            return super().write(s)

    out = Out()
    args = SimpleNamespace(max_new_tokens=50, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
                           min_new_tokens=0, stop=[])
    one_row = engine.Engine(model, tokenizer, max_batch=1)
    assert chat.reply(one_row, [{"role": "user", "content": "x"}], args, out) == text
    assert out.getvalue() == text + "\n"
    assert not any("\ufffd" in piece for piece in out.pieces)


def test_a_history_longer_than_the_context_is_cut_from_the_left(trained_ckpt):
    result = run_chat("--ckpt", trained_ckpt, "--prompt", "x = 1\n" * 100, "--max_new_tokens", "3")
    assert result.returncode == 0, result.stderr
    assert "keeping the last 63" in result.stderr


def test_bad_inputs_are_one_clear_sentence(trained_ckpt, tmp_path, capsys):
    result = run_chat("--ckpt", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert result.returncode == 1 and "ckpt.pt not found" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for args, message in ((["--temperature", "-1"], "--temperature must be a number >= 0"),
                          (["--temperature", "nan"], "--temperature must be a number >= 0"),
                          (["--max_new_tokens", "0"], "--max_new_tokens >= 1"),
                          (["--top_p", "0"], "--top_p must be in (0, 1]"),
                          (["--top_k", "0"], "--top_k must be >= 1"),
                          (["--seed", "-1"], "--seed must be between 0 and 2**63 - 1")):
        with pytest.raises(SystemExit) as e:
            chat.main(["--ckpt", trained_ckpt, "--prompt", "hi", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err, args
