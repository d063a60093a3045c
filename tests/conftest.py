"""Shared fixtures: a small real corpus prepared once, and a tiny model trained on it once."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import prepare_data

# Without a GPU, myllm_kernels/ runs in Triton's CPU interpreter. Triton reads this when myllm_kernels is imported (and
# again at each launch), so it is set here, before any test module imports the model or the kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# One thread per process: the distributed tests run two ranks on a 2-core machine, and torch's default of a thread
# per core in each oversubscribes the cores (OpenMP threads spin-wait; a second busy process can slow two-thread
# torch many times over). Set for this process and, through the environment, for every process a test starts.
os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or "1"
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
# A few standard-library modules: real Python source that every Python install carries.
STDLIB_FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py",
                "string.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py"]


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> str:
    """A prepared data folder (train.bin, val.bin, meta.json, tokenizer.model) with a 512-token vocabulary."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        shutil.copyfile(stdlib / name, root / name.replace("/", "_"))
    out = root / "data"
    prepare_data.main(["--input", *map(str, sorted(root.glob("*.py"))), "--out", str(out),
                       "--vocab_size", "512", "--val_fraction", "0.2", "--workers", "1"])
    return str(out)


@pytest.fixture(scope="session")
def trained_ckpt(prepared_data, tmp_path_factory) -> str:
    """The out_dir of a tiny model trained for a few dozen steps on prepared_data."""
    out = tmp_path_factory.mktemp("trained")
    subprocess.run([sys.executable, str(ROOT / "train.py"), f"--data_dir={prepared_data}", f"--out_dir={out}",
                    "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--n_embd=64", "--block_size=64",
                    "--batch_size=8", "--max_iters=40", "--eval_interval=40", "--eval_iters=2",
                    "--warmup_iters=5", "--lr_decay_iters=40", "--learning_rate=3e-3"],
                   cwd=ROOT, check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="session")
def addition_sft(trained_ckpt, prepared_data, tmp_path_factory):
    """(out_dir, data_dir) of trained_ckpt fine-tuned on one-digit additions (tasks.py) for 300 steps, the start of
    the RL and DPO tests: its prompts fit the 64-token window with room for a reply."""
    root = tmp_path_factory.mktemp("addition_sft")
    for args in (["tasks.py", "--task", "addition", "--digits", "1", "--n", "2000", "--out", str(root / "add.jsonl")],
                 ["prepare_data.py", "--chat", "--input", str(root / "add.jsonl"), "--out", str(root / "data"),
                  "--tokenizer", os.path.join(prepared_data, "tokenizer.model"), "--no_near_dedup", "--workers", "1",
                  "--val_fraction", "0.1"],
                 ["train.py", f"--init_from={trained_ckpt}", f"--data_dir={root / 'data'}", f"--out_dir={root / 'sft'}",
                  "--batch_size=8", "--max_iters=300", "--eval_interval=300", "--eval_iters=2", "--warmup_iters=2",
                  "--lr_decay_iters=300", "--learning_rate=3e-3"]):
        subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=ROOT, check=True,
                       capture_output=True)
    return str(root / "sft"), str(root / "data")
