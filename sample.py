"""
sample.py: generate text from a checkpoint written by train.py, streaming tokens as they come.

    python sample.py --ckpt out/cpu_demo --prompt "def fibonacci(n):" --max_new_tokens 200
    python sample.py --ckpt out/cpu_demo --prompt_file prompt.txt --num_samples 3 --temperature 0

The one idea: generation is a loop of "one forward pass, pick one token". With a KV cache each step
feeds only the newest token (keys and values of the earlier ones are kept), so a step costs the
same at position 10 as at position 500 instead of re-reading the whole prefix.
"""

import argparse
import math
import sys
import time

import torch

from checkpoint import load_model
from configurator import resolve_device
from model import KVCache
from tokenizer import EOS_ID


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    """The options of every command that generates (this one, chat.py): length, sampling, seed, device."""
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
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


class TextStream:
    """Prints generated text as its tokens arrive. Each time, everything generated so far is decoded and what is
    new printed: a character may span several byte-fallback tokens, and an unfinished one decodes to U+FFFD until
    its last byte comes, so it waits (decoding token by token would print broken characters)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids, self.printed = [], ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self) -> str:
        """Prints the rest (an unfinished character as U+FFFD) and a newline; returns the whole text."""
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[len(self.printed):] + "\n")
        self.out.flush()
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out", help="out_dir of a training run (ckpt.pt + tokenizer.model)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    parser.add_argument("--prompt_file", help="read the prompt from this file instead")
    parser.add_argument("--num_samples", type=int, default=1)
    add_sampling_arguments(parser, temperature=0.8)
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if args.num_samples < 1:
        parser.error("--num_samples must be >= 1")

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.ckpt, device)
    prompt = args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"cannot read --prompt_file {args.prompt_file}: {e}")
    # Every training document starts right after a </s>, so an empty prompt starts from one: the
    # model then writes the beginning of a fresh document.
    ids = tokenizer.encode(prompt) if prompt else [EOS_ID]
    limit = model.config.block_size - 1  # leave room for at least one new token in the context
    if len(ids) > limit:
        print(f"warning: the prompt has {len(ids)} tokens, more than the context allows; keeping the last {limit}",
              file=sys.stderr)
        ids = ids[-limit:]

    generated, seconds = 0, 0.0
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n---------- sample {sample + 1} ----------")
        sys.stdout.write(prompt)
        stream = TextStream(tokenizer, sys.stdout)
        t0 = time.time()
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        for token in model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p):
            token = token.item()
            generated += 1
            if token == EOS_ID:
                break
            stream.add(token)
        stream.finish()
        seconds += time.time() - t0
    print(f"\n{generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s on {device}", file=sys.stderr)
    # What each token of context costs in the KV cache, all layers: the number that caps batch x context.
    dtype = model.wte.weight.dtype
    print(f"KV cache: {KVCache.bytes_per_token(model.config, dtype):,} bytes per token "
          f"({model.config.attn}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)


if __name__ == "__main__":
    main()
