"""
chat.py: talk with a fine-tuned checkpoint in the terminal, each reply streaming as it is written.

    python chat.py --ckpt out/sft_add2                              # interactive: /reset, /quit, Ctrl-D
    python chat.py --ckpt out/sft_add2 --system "You are terse."
    python chat.py --ckpt out/sft_add2 --prompt "What is 2 + 3?"    # one reply, printed alone (for scripts)

The one idea: the model keeps nothing between turns. Each turn the whole conversation is rendered again in
ChatML and the model continues after "<|im_start|>assistant\\n", where fine-tuning taught it a reply begins;
the reply ends where the model writes <|im_end|>, and its text goes back into the history for the next turn.
Ctrl-C during a reply stops it (what was printed stays as the assistant's turn); at the prompt it exits.
"""

import argparse
import sys

import torch

from checkpoint import load_model
from configurator import resolve_device
from sample import TextStream, add_sampling_arguments, check_sampling_arguments, generation_options
from tokenizer import EOS_ID, IM_END_ID


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out", help="out_dir of a training run (ckpt.pt + tokenizer.model)")
    parser.add_argument("--system", default="", help="system message that opens the conversation (kept by /reset)")
    parser.add_argument("--prompt", default=None, help="answer this one message, print the reply only, and exit")
    add_sampling_arguments(parser, temperature=0.7)
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    return args


def reply(model, tokenizer, messages: list[dict], args: argparse.Namespace, out) -> str:
    """Stream the assistant's reply to messages into out and return its text; if Ctrl-C stops it, what was printed."""
    ids = tokenizer.render_chat(messages, generation_prompt=True)[0]
    limit = model.config.block_size - 1  # leave room for at least one new token in the context
    if len(ids) > limit:
        print(f"warning: the conversation has {len(ids)} tokens, more than the context allows; keeping the last "
              f"{limit} (/reset starts afresh)", file=sys.stderr)
        ids = ids[-limit:]
    idx = torch.tensor([ids], dtype=torch.long, device=model.wte.weight.device)
    stream = TextStream(tokenizer, out, args.stop)
    try:
        for token in model.generate(idx, args.max_new_tokens, **generation_options(args, [IM_END_ID, EOS_ID])):
            if token.item() in (IM_END_ID, EOS_ID) or stream.add(token.item()):
                break
    except KeyboardInterrupt:
        # The history must hold what the user saw, not the half character still waiting for its bytes.
        out.write("\n")
        return stream.printed
    return stream.finish()


def converse(model, tokenizer, system: list[dict], args: argparse.Namespace) -> None:
    """The interactive loop: read a line, answer it with the whole history as context, until /quit or EOF."""
    print(f"chatting with {args.ckpt}: /reset clears the history, /quit or Ctrl-D leaves, Ctrl-C stops a reply",
          file=sys.stderr)
    messages = list(system)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()  # so that the shell's prompt starts on a line of its own
            return
        if line == "/quit":
            return
        if line == "/reset":
            messages = list(system)
            print("(history cleared)", file=sys.stderr)
        elif line:
            messages.append({"role": "user", "content": line})
            text = reply(model, tokenizer, messages, args, sys.stdout)
            messages.append({"role": "assistant", "content": text})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.ckpt, device)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(model, tokenizer, system + [{"role": "user", "content": args.prompt}], args, sys.stdout)
    else:
        converse(model, tokenizer, system, args)


if __name__ == "__main__":
    main()
