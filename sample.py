"""
sample.py: generate text from a checkpoint written by train.py, streaming tokens as they come.

    python sample.py --ckpt out/cpu_demo --prompt "def fibonacci(n):" --max_new_tokens 200
    python sample.py --ckpt out/cpu_demo --prompt_file prompt.txt --num_samples 3 --temperature 0
    python sample.py --ckpt out/cpu_demo --prompt "def " --temperature 0 --num_beams 4 --stop "\n\n"
    python sample.py --ckpt out/cpu_demo --prompts_file prompts.txt --temperature 0   # one batch, a prompt a line
    python sample.py --ckpt out/mtp --prompt "def " --temperature 0 --speculative   # MTP drafts, the model verifies

The one idea: generation is a loop of "one forward pass, pick one token". With a KV cache each step
feeds only the newest token (keys and values of the earlier ones are kept), so a step costs the
same at position 10 as at position 500 instead of re-reading the whole prefix.
"""

import argparse
import io
import math
import sys
import time

import torch

from checkpoint import load_model
from configurator import resolve_device
from model import KVCache, beam_search, speculative_generate
from tokenizer import EOS_ID, PAD_ID


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    """The options of every command that generates (this one, chat.py): length, sampling, seed, device."""
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 makes seen tokens less likely")
    parser.add_argument("--min_new_tokens", type=int, default=0, help="no end of text before this many tokens")
    parser.add_argument("--stop", action="append", default=[], help="end where the text holds this string "
                        "(repeat for several); the string itself is not printed")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")


def check_sampling_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.temperature < math.inf or args.max_new_tokens < 1:
        parser.error("--temperature must be a number >= 0 and --max_new_tokens >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top_p must be in (0, 1]")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top_k must be >= 1")
    if not 0 <= args.seed < 2**63:
        parser.error("--seed must be between 0 and 2**63 - 1")
    if not 0 < args.repetition_penalty < math.inf:
        parser.error("--repetition_penalty must be a number > 0 (1 is none)")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        parser.error("--min_new_tokens must be between 0 and --max_new_tokens")
    if "" in args.stop:
        parser.error("--stop needs a non-empty string")


def generation_options(args: argparse.Namespace, stop_ids) -> dict:
    """The keyword arguments of Transformer.generate that the command line sets (add_sampling_arguments)."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens, stop_ids=stop_ids)


class TextStream:
    """Prints generated text as its tokens arrive. Each time, everything generated so far is decoded and what is
    new printed: a character may span several byte-fallback tokens, and an unfinished one decodes to U+FFFD until
    its last byte comes, so it waits (decoding token by token would print broken characters). With stop strings,
    the text ends before the first one, and an ending that could be the start of one waits until it is not."""

    def __init__(self, tokenizer, out, stop=()):
        self.tokenizer, self.out, self.stop = tokenizer, out, list(stop)
        self.ids, self.printed, self.stopped = [], "", False

    def add(self, token: int) -> bool:
        """Takes one more token; True once the text holds a stop string (the caller stops generating)."""
        self.ids.append(token)
        text = self.text()
        if self.stopped:
            self._write(text)
        elif not text.endswith("\ufffd"):
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            self._write(text[:len(text) - held])
        return self.stopped

    def text(self) -> str:
        """All generated so far, cut before the first stop string (which sets stopped)."""
        text = self.tokenizer.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        self.stopped = bool(cuts)
        return text[:min(cuts)] if cuts else text

    def _write(self, text: str) -> None:
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def finish(self) -> str:
        """Prints the rest (an unfinished character as U+FFFD); returns the whole text."""
        text = self.text()
        self._write(text)
        return text


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out", help="out_dir of a training run (ckpt.pt + tokenizer.model)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    parser.add_argument("--prompt_file", help="read the prompt from this file instead")
    parser.add_argument("--prompts_file", help="continue every line of this file, all in one left-padded batch")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--num_beams", type=int, default=1, help="> 1: beam search (model.beam_search)")
    parser.add_argument("--length_penalty", type=float, default=1.0, help="beam search: > 0 favours longer text")
    parser.add_argument("--speculative", action="store_true", help="greedy, with the model's first MTP module "
                        "drafting each next token (model.speculative_generate): the same text, fewer forwards")
    add_sampling_arguments(parser, temperature=0.8)
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if args.num_samples < 1 or args.num_beams < 1:
        parser.error("--num_samples and --num_beams must be >= 1")
    if args.num_beams > 1 and (args.temperature > 0 or args.repetition_penalty != 1 or args.min_new_tokens):
        parser.error("--num_beams > 1 is beam search, which does not sample and applies no penalty: pass "
                     "--temperature 0, without --repetition_penalty and --min_new_tokens")
    if args.speculative and (args.temperature > 0 or args.repetition_penalty != 1 or args.min_new_tokens or
                             args.num_beams > 1 or args.prompts_file):
        parser.error("--speculative decodes one prompt greedily: pass --temperature 0, without --repetition_penalty, "
                     "--min_new_tokens, --num_beams and --prompts_file")
    if args.prompts_file and (args.prompt or args.prompt_file or args.num_samples > 1):
        parser.error("--prompts_file gives the prompts, one sample each: without --prompt, --prompt_file and "
                     "--num_samples")
    return args


def read_prompts(args) -> list[str]:
    """The text to continue: --prompt, the whole --prompt_file, or each line of --prompts_file."""
    path = args.prompt_file or args.prompts_file
    if path is None:
        return [args.prompt]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read {'--prompt_file' if args.prompt_file else '--prompts_file'} {path}: {e}")
    return [text] if args.prompt_file else text.splitlines()


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    # Every training document starts right after a </s>, so an empty prompt starts from one: the
    # model then writes the beginning of a fresh document.
    return tokenizer.encode(prompt) if prompt else [EOS_ID]


def prompt_ids(tokenizer, prompt: str, limit: int) -> list[int]:
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) > limit:
        print(f"warning: the prompt has {len(ids)} tokens, more than the context allows; keeping the last {limit}",
              file=sys.stderr)
        ids = ids[-limit:]
    return ids


def left_padded(prompts: list[list[int]], device):
    """Prompts of different lengths as one batch: ids (B, T) padded on the left, so that every row's next token
    is the same column, and is_real (B, T), the mask that keeps the padding out of attention and positions."""
    width = max(map(len, prompts))
    idx = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts], device=device)
    is_real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return idx, is_real


def continuations(model, prompts: list[list[int]], args, stats: dict):
    """Each prompt's new tokens, the prompts left-padded into one batch: (B,) per step, or for beam search each
    row's whole list at once (a hypothesis is known only at the end). stats: speculative decoding's counts."""
    idx, is_real = left_padded(prompts, model.wte.weight.device)
    if args.speculative:  # the whole continuation stays in the cache (no sliding restart), as in beam search
        n = min(args.max_new_tokens, model.config.block_size - idx.size(1) - 1)
        return speculative_generate(model, idx, n, [EOS_ID], stats)
    if args.num_beams > 1:
        n = min(args.max_new_tokens, model.config.block_size - idx.size(1))
        rows = beam_search(model, idx, n, args.num_beams, [EOS_ID], args.length_penalty, attention_mask=is_real)
        return [torch.tensor([row[t] if t < len(row) else EOS_ID for row in rows]) for t in range(n)]
    return model.generate(idx, args.max_new_tokens, attention_mask=is_real, **generation_options(args, [EOS_ID]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.ckpt, device)
    prompts = read_prompts(args)
    limit = model.config.block_size - 1  # leave room for at least one new token in the context
    ids = [prompt_ids(tokenizer, prompt, limit) for prompt in prompts]

    generated, t0, stats = 0, time.time(), {}
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n---------- sample {sample + 1} ----------")
        # One prompt streams as it comes; a batch prints when every row is done.
        streams = [TextStream(tokenizer, sys.stdout if len(prompts) == 1 else io.StringIO(), args.stop)
                   for _ in prompts]
        if len(prompts) == 1:
            sys.stdout.write(prompts[0])
        done = [False] * len(prompts)
        try:
            for tokens in continuations(model, ids, args, stats):
                for row, token in enumerate(tokens.tolist()):
                    if not done[row]:
                        generated += 1
                        done[row] = token == EOS_ID or streams[row].add(token)
                if all(done):
                    break
        except ValueError as e:  # what the model cannot do with these settings (speculative_generate's checks)
            raise SystemExit(f"sample.py: {e}") from None
        if len(prompts) == 1:
            streams[0].finish()
            print()
        for i, (prompt, stream) in enumerate(zip(prompts, streams) if len(prompts) > 1 else []):
            print(f"---------- prompt {i + 1} ----------\n{prompt}{stream.text()}")
    seconds = time.time() - t0
    print(f"\n{generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s on {device}", file=sys.stderr)
    if stats.get("drafted"):
        print(f"speculative: {stats['accepted']} of {stats['drafted']} drafts accepted "
              f"({stats['accepted'] / stats['drafted']:.1%})", file=sys.stderr)
    # What each token of context costs in the KV cache, all layers: the number that caps batch x context.
    dtype = model.wte.weight.dtype
    fixed = KVCache.bytes_per_sequence(model.config, dtype)  # what does not grow: linear states, sliding windows
    print(f"KV cache: {KVCache.bytes_per_token(model.config, dtype):,} bytes per token "
          f"({model.config.attn}, {str(dtype).removeprefix('torch.')})"
          + (f" + {fixed:,} bytes per sequence (linear and sliding-window layers)" if fixed else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
