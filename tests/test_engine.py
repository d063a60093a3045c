"""engine.py: every request in a continuous batch computes what a full forward of its sequence computes (float64,
per step), gets exactly the tokens it gets alone (float32, 16 at once), and leaves when done or cancelled."""

import threading

import pytest
import torch

import engine
from checkpoint import load_model
from engine import Engine, QueueFull, Request, Sampling
from model import ModelConfig, Transformer
from tokenizer import EOS_ID

MLA_TINY = dict(attn="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


class Collected:
    """A request's callback: each choice's text and finish, as the engine reports them."""

    def __init__(self, n=1):
        self.text, self.finish, self.n_tokens = [""] * n, [None] * n, [0] * n

    def __call__(self, index, text, finish_reason, n_tokens):
        assert self.finish[index] is None, "nothing may follow a choice's end"
        self.text[index] += text
        self.finish[index], self.n_tokens[index] = finish_reason, n_tokens


def run(eng, requests):
    for request in requests:
        eng.submit(request)
    while eng.step():
        pass


@pytest.fixture(scope="module")
def tokenizer(trained_ckpt):
    return load_model(trained_ckpt, "cpu")[1]


def tiny_model(vocab_size, **arch):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         attn_impl="sdpa", **arch)
    return Transformer(config).eval()


HYBRID = dict(layer_types=["linear_attention", "full_attention"], linear_chunk_size=4)


SLIDING = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=5)


@pytest.mark.parametrize("arch", [{}, MLA_TINY, HYBRID, {**HYBRID, "layer_types": ["linear_attention"] * 2}, SLIDING,
                                  {**SLIDING, **MLA_TINY, "layer_types": ["sliding_attention"] * 2},
                                  {**MLA_TINY, "index_n_heads": 4, "index_head_dim": 8, "index_topk": 4},
                                  {"moba_chunk_size": 4, "moba_topk": 2}],
                         ids=["gqa", "mla", "hybrid", "linear", "sliding", "sliding_mla", "dsa", "moba"])
def test_each_step_equals_a_full_forward_of_the_sequence(tokenizer, monkeypatch, arch):
    model = tiny_model(tokenizer.vocab_size, **arch).double()
    seen = []  # (choice, tokens so far, the logits it picked from)
    pick = engine.Choice.pick
    monkeypatch.setattr(engine.Choice, "pick", lambda self, logits: seen.append((self, list(self.tokens), logits))
                        or pick(self, logits))
    eng = Engine(model, tokenizer, max_batch=4)
    prompts = [[7, 8, 9], list(range(10, 30)), [5]]
    requests = [Request(p, Sampling(max_tokens=12, temperature=0, n=2 if i == 1 else 1), Collected(2))
                for i, p in enumerate(prompts)]
    eng.submit(requests[0])
    eng.submit(requests[1])
    for _ in range(4):  # the third joins while the others are halfway
        eng.step()
    run(eng, requests[2:])
    assert len(seen) == 4 * 12 and not eng.active()
    with torch.no_grad():
        for choice, tokens, logits in seen:
            full = model(torch.tensor([tokens]))[0][:, -1]
            torch.testing.assert_close(logits, full.float(), rtol=0, atol=1e-6)  # the engine picks in float32


def test_sixteen_at_once_get_exactly_the_tokens_each_gets_alone(trained_ckpt, monkeypatch):
    model, tokenizer = load_model(trained_ckpt, "cpu")
    prompts = [tokenizer.encode(f"def f{i}(x):\n    return " + "x * " * (i % 5)) for i in range(16)]
    # Greedy, and sampled with a seed: both must not depend on the others in flight.
    settings = [dict(temperature=0) if i % 2 else dict(temperature=0.9, top_p=0.9, seed=i) for i in range(16)]
    logits_seen = {}  # request -> the logits of each of its steps: equal to the last bit, not only their argmax
    pick = engine.Choice.pick
    monkeypatch.setattr(engine.Choice, "pick", lambda self, logits: logits_seen.setdefault(self.request, [])
                        .append(logits) or pick(self, logits))

    def requests():
        return [Request(p, Sampling(max_tokens=20, **s), Collected()) for p, s in zip(prompts, settings)]

    def served(together, max_batch=16):
        rs, eng = requests(), Engine(model, tokenizer, max_batch=max_batch)
        for batch in [rs] if together else [[r] for r in rs]:
            run(eng, batch)
        return [r.on_text.text[0] for r in rs], [torch.cat(logits_seen[r]) for r in rs]

    (text_together, logits_together), (text_alone, logits_alone) = served(True), served(False)
    assert text_together == text_alone and len(set(text_together)) > 8
    assert all(torch.equal(a, b) for a, b in zip(logits_together, logits_alone))
    # The check can fail: a decode of one row (a batch that changes shape) is not bitwise the 16-row one.
    assert not all(torch.equal(a, b) for a, b in zip(logits_together, served(False, max_batch=1)[1]))


def test_choices_are_seeded_one_by_one_and_end_with_the_reason(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    twice = [Request([3, 4, 5], Sampling(max_tokens=10, temperature=1.0, seed=7, n=3), Collected(3)) for _ in "ab"]
    run(Engine(model, tokenizer, max_batch=3), twice)
    assert twice[0].on_text.text == twice[1].on_text.text and len(set(twice[0].on_text.text)) == 3
    assert twice[0].on_text.finish == ["length"] * 3 and twice[0].on_text.n_tokens == [10] * 3
    # A stop id ends a choice with "stop"; its own text is not part of the reply.
    with torch.no_grad():
        first = int(model(torch.tensor([[3, 4, 5]]))[0][0, -1].argmax())
    stopped = Collected()
    run(Engine(model, tokenizer), [Request([3, 4, 5], Sampling(max_tokens=10, temperature=0, stop_ids=(first,)),
                                           stopped)])
    assert stopped.text == [""] and stopped.finish == ["stop"] and stopped.n_tokens == [1]


def test_a_cancelled_request_frees_its_rows_for_the_next_in_line(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    eng = Engine(model, tokenizer, max_batch=2, max_queue=1)
    long, next_in_line = Request([3], Sampling(max_tokens=40, n=2), Collected(2)), Request([4], Sampling(5), Collected())
    eng.submit(long)
    eng.step()
    eng.submit(next_in_line)
    eng.step()
    assert [c.request for c in eng.active()] == [long, long] and list(eng.waiting) == [next_in_line]
    with pytest.raises(QueueFull):
        eng.submit(Request([5], Sampling(5), Collected()))
    eng.cancel(long)
    while eng.step():
        pass
    assert eng.cancelled == 1 and long.on_text.finish == [None, None] and next_in_line.on_text.finish == ["length"]
    for bad in (Sampling(5, n=3), Sampling(48)):
        with pytest.raises(ValueError):
            eng.submit(Request([3], bad, Collected(3)))


def test_a_failing_step_answers_everyone_and_the_loop_goes_on(tokenizer, monkeypatch):
    model = tiny_model(tokenizer.vocab_size)
    eng = Engine(model, tokenizer, max_batch=1)
    calls = {"n": 0}
    forward = Transformer.forward

    def fails_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", fails_once)
    stopped = threading.Event()
    thread = threading.Thread(target=eng.run, args=(stopped,))
    thread.start()
    failed, served = Collected(), Collected()
    eng.submit(Request([EOS_ID], Sampling(4), failed))
    for _ in range(100):
        if failed.finish[0]:
            break
        threading.Event().wait(0.05)
    eng.submit(Request([EOS_ID], Sampling(4), served))
    for _ in range(100):
        if served.finish[0]:
            break
        threading.Event().wait(0.05)
    stopped.set()
    thread.join()
    assert failed.finish == ["error"] and "RuntimeError: out of memory" in failed.text[0]
    assert served.finish == ["length"] and served.n_tokens == [4]
