"""
bench/shakespeare.py: myllm against nanoGPT's CPU result on tiny Shakespeare, in bits per byte.

    python bench/shakespeare.py --input path/to/tinyshakespeare.txt

nanoGPT's README trains a character-level model on the CPU (config/train_shakespeare_char.py with
its CPU overrides) and reports val loss 1.88 nats per character after about 3 minutes; the text is
ASCII, so that is 1.88 / ln 2 = 2.71 bits per byte. Bits per byte is the one number that compares
models with different tokenizers: total information over total text. This script splits the file as
nanoGPT does (first 90% train, last 10% val), prepares it with our tokenizer, trains
config/shakespeare_cpu.py, and prints both results with wall times. Then it measures training
tokens/s of a 6-layer, 384-wide model on the same data.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# nanoGPT @3adf61e, README CPU command, measured on this project's 2-core machines (torch 2.13, fp32):
NANOGPT_VAL_BPB = 1.8857 / 0.6931471805599453
NANOGPT_WALL_S = 115.0
NANOGPT_6x384_TOKENS_PER_S = 533  # 6 layers, 384 wide, block 256, batch 8, GPT-2 vocabulary (50,257)


def run(cmd: list[str]) -> float:
    """Runs a command from the repository root, showing its output; returns its wall time."""
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def last_record(out_dir: str, key: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r][-1]


def prepare(input_path: str, work: str) -> tuple[str, float]:
    """nanoGPT's split (first 90% of the characters train, the rest val), prepared with a 1,024-token tokenizer into
    work/data: (that folder, seconds taken)."""
    if not os.path.isfile(input_path):
        raise SystemExit(f"{input_path} not found")
    with open(input_path, encoding="utf-8") as f:
        text = f.read()
    split = int(len(text) * 0.9)
    for name, part in (("train.txt", text[:split]), ("val.txt", text[split:])):
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(part)
    data = os.path.join(work, "data")
    seconds = run([sys.executable, "prepare_data.py", "--input", os.path.join(work, "train.txt"),
                   "--val_input", os.path.join(work, "val.txt"), "--vocab_size", "1024", "--out", data])
    return data, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="tinyshakespeare.txt (1,115,394 characters)")
    parser.add_argument("--work_dir", default=None, help="where data and checkpoints go (default: a temp folder)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="shakespeare_")
    data, prepare_s = prepare(args.input, work)
    out = os.path.join(work, "out")
    train_s = run([sys.executable, "train.py", "config/shakespeare_cpu.py", f"--data_dir={data}", f"--out_dir={out}"])
    val_bpb = last_record(out, "val_bpb")["val_bpb"]

    speed_out = os.path.join(work, "out_6x384")
    run([sys.executable, "train.py", "config/shakespeare_cpu.py", f"--data_dir={data}", f"--out_dir={speed_out}",
         "--n_layer=6", "--n_head=6", "--n_kv_head=6", "--n_embd=384", "--block_size=256", "--batch_size=8",
         "--max_iters=20", "--eval_interval=1000", "--log_interval=1", "--always_save_checkpoint=False"])
    with open(os.path.join(speed_out, "metrics.jsonl")) as f:
        speeds = sorted(r["tokens_per_s"] for r in map(json.loads, f) if "tokens_per_s" in r)
    tokens_per_s = speeds[len(speeds) // 2]  # median: the first steps warm up

    print("\n| run | val bits per byte | wall time |")
    print("|---|---|---|")
    print(f"| nanoGPT shakespeare_char, CPU command (reference) | {NANOGPT_VAL_BPB:.3f} | {NANOGPT_WALL_S:.0f} s |")
    print(f"| myllm config/shakespeare_cpu.py | {val_bpb:.3f} | {train_s:.0f} s (+ {prepare_s:.0f} s prepare) |")
    print(f"\nratio of bits per byte (myllm / nanoGPT): {val_bpb / NANOGPT_VAL_BPB:.3f}; "
          f"ratio of wall time: {(train_s + prepare_s) / NANOGPT_WALL_S:.2f}")
    print(f"6 layers x 384 wide, block 256, batch 8, vocab 1024: {tokens_per_s:,.0f} training tokens/s "
          f"(nanoGPT with the GPT-2 vocabulary here: {NANOGPT_6x384_TOKENS_PER_S} tokens/s)")


if __name__ == "__main__":
    main()
