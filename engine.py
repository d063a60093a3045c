"""
engine.py: continuous batching, the generation loop behind serve.py and chat.py.

    engine = Engine(model, tokenizer, max_batch=16)
    engine.submit(Request(prompt_ids, Sampling(max_tokens=64, temperature=0), on_text=print))
    while engine.step():   # or engine.run(stopped) in a thread of its own, as serve.py does
        pass

The one idea: requests do not wait for each other. A static batch starts together and lasts until its longest
row ends; here every step is one forward over whatever sequences are in flight. A new request is prefilled on
its own and joins at the next step; a finished one leaves at once, and its row goes to the next request in line
(iteration-level scheduling, Orca, Yu et al., OSDI 2022; what vLLM and TGI call continuous batching).

Each sequence owns one row of a SlotCache: block_size positions, its own length, its own RoPE position. A paged
cache (vLLM's PagedAttention) hands out memory in small blocks as sequences grow, which pays when contexts are
long and lengths vary; here a row of the whole context costs block_size * KVCache.bytes_per_token (1 MiB at
cpu_demo's size), so preallocated rows are simpler and lose nothing.

Batch invariance: a request gets the same tokens whoever else is in flight. On this CPU a matrix product's row
depends on how many rows the product has (the library picks its kernel by shape: a 1-row product differs from
a 16-row one in the last bits), and attention over more (masked) keys sums in another order. So the decode
always runs all max_batch rows, empty ones included, over all block_size positions: every step has one shape,
and a row's numbers depend on that row alone (Thinking Machines, "Defeating Nondeterminism in LLM Inference",
2025, made the kernels invariant instead). A prefill runs one request alone. The cost is the empty rows' work:
bench/serve.py measures it. MoE layers are the exception: an expert runs on the tokens routed to it, a count
that depends on the batch, so an MoE model's greedy tokens may differ in the last bits between loads.
"""

import collections
import threading
from dataclasses import dataclass, field

import torch

from model import KVCache, next_token, roll_window, update_rolling
from sample import TextStream


class SlotCache:
    """max_batch rows of KVCache's tensors, each row one sequence's cache with its own length.

    It speaks KVCache's language to Transformer.forward for one new token per row: append() marks the new key
    real in the rows that are active and returns the real-key mask (B, block_size), from which forward builds
    each row's attention mask; n_real is each row's next RoPE position; update() writes each row's new key at
    that row's own position and returns the whole rows. length is the longest row (forward's context check)."""

    def __init__(self, config, n_rows, device):
        layout = KVCache(config, 0, 0)  # which cache slots are full layers, and how much a sliding layer keeps
        self.full, self.keep, self.max_len = layout.full, layout.keep, config.block_size
        self.tensors = None  # (full-attention layers, n_rows, heads, block_size, dim) each, allocated by the first insert
        self.linear_states = {}  # layer -> (conv state, S) of every row, for linear-attention layers
        # A sliding layer's last keep keys per row: every row takes one token per step (an empty row a masked one),
        # so each row's window rolls with its own sequence, whatever the others' lengths.
        self.rolling = {}
        self.window_is_real = torch.zeros(n_rows, self.keep, dtype=torch.bool, device=device)
        self.key_is_real = torch.zeros(n_rows, config.block_size, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.padded = True  # rows of different lengths: forward always needs the mask

    @property
    def length(self):
        return int(self.n_real.max())

    def insert(self, row, cache: KVCache):
        """Take a prefilled one-row KVCache (a prompt of cache.length tokens) into row."""
        n, n_rows = cache.length, self.key_is_real.size(0)
        if self.tensors is None and cache.tensors is not None:
            self.tensors = [t.new_zeros(t.size(0), n_rows, *t.shape[2:]) for t in cache.tensors]
        for stored, t in zip(self.tensors or [], cache.tensors or []):
            stored[:, row, :, :n] = t[:, 0, :, :n]
        for states, theirs in ((self.linear_states, cache.linear_states), (self.rolling, cache.rolling)):
            for layer, state in theirs.items():
                if layer not in states:
                    states[layer] = tuple(t.new_zeros(n_rows, *t.shape[1:]) for t in state)
                for stored, t in zip(states[layer], state):
                    stored[row] = t[0]
        self.window_is_real[row] = cache.window_is_real[0]
        self.key_is_real[row] = False  # what a previous sequence left beyond n is masked, then overwritten
        self.key_is_real[row, :n] = True
        self.n_real[row] = n

    def release(self, row):
        self.key_is_real[row] = False
        self.n_real[row] = 0

    def append(self, is_real):
        """is_real (B, 1): the rows that take a token this step."""
        rows = is_real[:, 0]
        self.key_is_real[rows, self.n_real[rows]] = True
        self.n_real += rows
        self.window_keys_real, self.window_is_real = roll_window(self.window_is_real, is_real, self.keep)
        return self.key_is_real

    def update(self, layer, *new):
        """new (B, heads, 1, dim) each, written at each row's own position (an empty row writes position 0,
        masked and overwritten by the next insert); returns the whole rows (B, heads, block_size, dim). A sliding
        layer's: its kept keys and the new one (B, heads, keep + 1, dim), as KVCache rolls them."""
        if layer not in self.full:
            return update_rolling(self.rolling, layer, new, self.keep)
        rows = torch.arange(new[0].size(0), device=new[0].device)
        columns, i = (self.n_real - 1).clamp(min=0), self.full[layer]
        for stored, t in zip(self.tensors, new):
            stored[i][rows, :, columns] = t[:, :, 0]
        return tuple(stored[i] for stored in self.tensors)


@dataclass
class Sampling:
    """How one request's tokens are chosen and when they end. stop: strings that end the text (not included);
    stop_ids: tokens that end it (chat: <|im_end|>); seed: choice i draws from a generator seeded seed + i."""
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_ids: tuple = ()
    seed: int | None = None
    n: int = 1


class Request:
    """A prompt and its n choices in flight. on_text(index, text, finish_reason, n_tokens) is called from the
    engine's thread with each choice's new text, and once more with finish_reason "stop" or "length" when the
    choice ends (or "error", with the message as text, if the engine fails)."""

    def __init__(self, prompt: list[int], sampling: Sampling, on_text):
        self.prompt, self.sampling, self.on_text = prompt, sampling, on_text
        self.cancelled = False  # set by Engine.cancel, from any thread; the engine drops the request next step


class TextOut:
    """sample.TextStream's output for one choice: what it prints goes to the request's callback."""

    def __init__(self, request, index):
        self.request, self.index = request, index

    def write(self, text):
        if text:
            self.request.on_text(self.index, text, None, 0)

    def flush(self):
        pass


class Choice:
    """One sequence being generated: its cache row, its tokens, its text stream and its random stream."""

    def __init__(self, request, index, row, tokenizer, device):
        s = request.sampling
        self.request, self.index, self.row = request, index, row
        self.tokens = list(request.prompt)
        self.n_new = 0
        self.stream = TextStream(tokenizer, TextOut(request, index), s.stop)
        self.generator = None
        if s.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(s.seed + index if s.seed is not None else int(torch.randint(2**62, ())))

    def pick(self, logits):
        """The next token from this choice's logits (1, V), with its own options and random stream."""
        s = self.request.sampling
        tokens = is_real = None
        if s.repetition_penalty != 1.0:  # the only option that reads the tokens so far
            tokens = torch.tensor([self.tokens], device=logits.device)
            is_real = torch.ones_like(tokens, dtype=torch.bool)
        return int(next_token(logits, tokens, is_real, self.n_new, s.temperature, s.top_k, s.top_p,
                              s.repetition_penalty, s.min_tokens, s.stop_ids, self.generator))

    def add(self, token) -> bool:
        """Take the new token; True when the choice has ended (its last text and finish_reason are sent)."""
        s = self.request.sampling
        self.tokens.append(token)
        self.n_new += 1
        if token in s.stop_ids or self.stream.add(token):
            finish = "stop"
        elif self.n_new == s.max_tokens:
            finish = "length"
        else:
            return False
        self.stream.finish()
        self.request.on_text(self.index, "", finish, self.n_new)
        return True


class QueueFull(Exception):
    pass


class Engine:
    """The scheduler: a line of waiting requests, max_batch cache rows, and step(), one forward for all."""

    def __init__(self, model, tokenizer, max_batch=16, max_queue=64):
        self.model, self.tokenizer, self.max_batch, self.max_queue = model, tokenizer, max_batch, max_queue
        self.device = model.wte.weight.device
        self.cache = SlotCache(model.config, max_batch, self.device)
        self.rows = [None] * max_batch  # the Choice decoding in each cache row, None where free
        self.waiting = collections.deque()
        self.wake = threading.Condition()
        self.cancelled = 0  # requests dropped before their end (a client that went away), for /health

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when it cannot start at once and max_queue requests wait already (the caller
        answers "busy"): max_queue = 0 takes only what free rows can start."""
        if request.sampling.n > self.max_batch:
            raise ValueError(f"n = {request.sampling.n} is more than the {self.max_batch} sequences decoded at once")
        if len(request.prompt) + request.sampling.max_tokens > self.model.config.block_size:
            raise ValueError("the prompt and max_tokens exceed the context")
        with self.wake:
            can_start = self.rows.count(None) - sum(r.sampling.n for r in self.waiting) >= request.sampling.n
            if not can_start and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(request)
            self.wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request from any thread: its rows are freed at the next step. Harmless once it has ended."""
        request.cancelled = True
        with self.wake:
            self.wake.notify()

    def active(self) -> list:
        return [choice for choice in self.rows if choice is not None]

    @torch.inference_mode()
    def step(self) -> bool:
        """Drop cancelled requests, admit waiting ones into free rows, decode one token in every active row.
        Returns whether there is work left."""
        self.drop_cancelled()
        self.admit()
        if self.active():
            self.decode()
        return bool(self.waiting or self.active())

    def drop_cancelled(self):
        with self.wake:
            kept = [r for r in self.waiting if not r.cancelled]
            self.cancelled += len(self.waiting) - len(kept)
            self.waiting = collections.deque(kept)
        dropped = {id(c.request) for c in self.active() if c.request.cancelled}
        self.cancelled += len(dropped)
        for choice in self.active():
            if choice.request.cancelled:
                self.free(choice)

    def admit(self):
        """First come, first served: the head of the line waits until its n choices all have rows."""
        while True:
            free = [row for row, choice in enumerate(self.rows) if choice is None]
            with self.wake:
                if not self.waiting or len(free) < self.waiting[0].sampling.n:
                    return
                request = self.waiting.popleft()
            try:
                self.prefill(request, free)
            except Exception:  # back in line, none of its choices in a row, for fail_all to answer it once
                for choice in self.active():
                    if choice.request is request:
                        self.free(choice)
                with self.wake:
                    self.waiting.appendleft(request)
                raise

    def prefill(self, request, free):
        """Run the prompt alone (a batch of one: its numbers do not depend on who else is here), copy its cache
        into a row per choice, and pick each choice's first token from the prompt's last logits."""
        cache = KVCache(self.model.config, 1, self.model.config.block_size, device=self.device)
        logits, _ = self.model(torch.tensor([request.prompt], device=self.device), kv_cache=cache)
        logits = logits[:, -1].float()
        for index in range(request.sampling.n):
            row = free[index]
            self.cache.insert(row, cache)
            choice = self.rows[row] = Choice(request, index, row, self.tokenizer, self.device)
            if choice.add(choice.pick(logits.clone())):
                self.free(choice)

    def decode(self):
        """One forward of every row's newest token, (max_batch, 1); free rows run a dummy token, masked out."""
        last = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)
        is_real = torch.zeros(self.max_batch, 1, dtype=torch.bool, device=self.device)
        for choice in self.active():
            last[choice.row, 0], is_real[choice.row, 0] = choice.tokens[-1], True
        logits, _ = self.model(last, attention_mask=is_real, kv_cache=self.cache)
        logits = logits[:, -1].float()  # (max_batch, V)
        for choice in self.active():
            if choice.add(choice.pick(logits[choice.row : choice.row + 1])):
                self.free(choice)

    def free(self, choice):
        self.rows[choice.row] = None
        self.cache.release(choice.row)

    def fail_all(self, message):
        """After an error inside the engine: every request in flight or waiting gets it, and the rows are freed."""
        for choice in self.active():
            choice.request.on_text(choice.index, message, "error", choice.n_new)
            self.free(choice)
        with self.wake:
            waiting, self.waiting = self.waiting, collections.deque()
        for request in waiting:
            for index in range(request.sampling.n):
                request.on_text(index, message, "error", 0)

    def run(self, stopped: threading.Event) -> None:
        """The server's loop, in a thread of its own: step while there is work, sleep until a submit or cancel."""
        while not stopped.is_set():
            with self.wake:
                if not self.waiting and not self.active():
                    self.wake.wait(timeout=0.5)
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: answer everyone, keep serving
                self.fail_all(f"generation failed: {type(e).__name__}: {e}")
