"""
chat.py: talk with a fine-tuned checkpoint in the terminal, each reply streaming as it is written.

    python chat.py --ckpt out/sft_add2                              # interactive: /reset, /quit, Ctrl-D
    python chat.py --ckpt out/sft_add2 --system "You are terse."
    python chat.py --ckpt out/sft_add2 --prompt "What is 2 + 3?"    # one reply, printed alone (for scripts)

The one idea: the model keeps nothing between turns. Each turn the whole conversation is rendered again in
ChatML and the model continues after "<|im_start|>assistant\\n", where fine-tuning taught it a reply begins;
the reply ends where the model writes <|im_end|>, and its text goes back into the history for the next turn.
Ctrl-C during a reply stops it (what was printed stays as the assistant's turn); at the prompt it exits.
A reply is generated exactly as serve.py generates one: chat_prompt() renders the conversation, and the reply
is a request to the same continuous-batching engine (engine.py), here with one row.
"""

import argparse
import sys

import torch

from checkpoint import load_model
from configurator import resolve_device
from engine import Engine, Request, Sampling
from sample import add_sampling_arguments, check_sampling_arguments
from tokenizer import EOS_ID, IM_END_ID

CHAT_STOP_IDS = (IM_END_ID, EOS_ID)  # a reply ends at <|im_end|>; a </s> would end the whole text


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation's tokens, up to where the assistant's reply begins (what training taught it to see)."""
    return tokenizer.render_chat(messages, generation_prompt=True)[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out", help="out_dir of a training run (ckpt.pt + tokenizer.model)")
    parser.add_argument("--system", default="", help="system message that opens the conversation (kept by /reset)")
    parser.add_argument("--prompt", default=None, help="answer this one message, print the reply only, and exit")
    add_sampling_arguments(parser, temperature=0.7)
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    return args


def reply(engine: Engine, messages: list[dict], args: argparse.Namespace, out) -> str:
    """Stream the assistant's reply to messages into out and return its text; if Ctrl-C stops it, what was printed."""
    ids = chat_prompt(engine.tokenizer, messages)
    block = engine.model.config.block_size
    if len(ids) > block - 1:  # leave room for at least one new token in the context
        print(f"warning: the conversation has {len(ids)} tokens, more than the context allows; keeping the last "
              f"{block - 1} (/reset starts afresh)", file=sys.stderr)
        ids = ids[-(block - 1):]
    max_tokens = min(args.max_new_tokens, block - len(ids))
    sampling = Sampling(max_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                        min(args.min_new_tokens, max_tokens), args.stop, CHAT_STOP_IDS)
    printed, finish = [], []

    def on_text(index, text, finish_reason, n_tokens):
        out.write(text)
        out.flush()
        printed.append(text)
        finish.append(finish_reason)

    request = Request(ids, sampling, on_text)
    engine.submit(request)
    try:
        while engine.step():
            pass
    except KeyboardInterrupt:
        engine.cancel(request)
        engine.drop_cancelled()
    out.write("\n")
    if finish[-1:] == ["length"] and max_tokens < args.max_new_tokens:
        print("(the reply reached the end of the context; /reset starts afresh)", file=sys.stderr)
    return "".join(printed)


def converse(engine: Engine, system: list[dict], args: argparse.Namespace) -> None:
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
            text = reply(engine, messages, args, sys.stdout)
            messages.append({"role": "assistant", "content": text})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    engine = Engine(*load_model(args.ckpt, device), max_batch=1)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(engine, system + [{"role": "user", "content": args.prompt}], args, sys.stdout)
    else:
        converse(engine, system, args)


if __name__ == "__main__":
    main()
