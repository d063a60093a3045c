"""checkpoint.py: reading an out_dir back runs no code from it, loads exactly what was saved, says in one sentence
what is wrong with a bad one, and needs neither the training loop nor parallel.py."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint, load_model, remove_other_shards, save_checkpoint, shard_names
from test_train import ROOT


class RunsCode:
    """A pickle that, when unpickled without weights_only, calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "ckpt.pt"
    torch.save({"model": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(SystemExit, match="unpickling those could run code") as error:
        load_checkpoint(str(path), "cpu")
    assert "weights_only" not in str(error.value)  # torch's advice to load it anyway is not passed on
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"], check=True)
    assert marker.exists()  # so the refusal above is what kept it from running


def test_save_then_load_gives_back_the_same_tensors(tmp_path):
    checkpoint = {"model": {"w": torch.randn(3, 4), "b": torch.arange(5)}, "iter_num": 7, "name": "x"}
    save_checkpoint(str(tmp_path / "ckpt.pt"), checkpoint)
    loaded = load_checkpoint(str(tmp_path / "ckpt.pt"), "cpu", mmap=True)
    assert loaded["iter_num"] == 7 and loaded["name"] == "x"
    assert all(torch.equal(loaded["model"][k], v) for k, v in checkpoint["model"].items())
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_older_shards_go_and_the_named_ones_stay(tmp_path):
    keep = shard_names(20, 2)
    assert keep == ["optimizer.20.0-of-2.pt", "optimizer.20.1-of-2.pt"]
    for name in [*keep, *shard_names(10, 3), "ckpt.pt", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    remove_other_shards(str(tmp_path), keep)
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "ckpt.pt", "notes.txt"])


def test_load_model_gives_the_trained_weights_in_eval_mode(trained_ckpt):
    model, tokenizer = load_model(trained_ckpt, "cpu")
    saved = torch.load(os.path.join(trained_ckpt, "ckpt.pt"), weights_only=True)["model"]
    assert not model.training and tokenizer.vocab_size == model.config.vocab_size
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_empty_and_foreign_files_are_one_sentence(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "other.pt").write_bytes(pickle.dumps([1, 2, 3]))
    for name in ("empty.pt", "other.pt"):
        with pytest.raises(SystemExit, match=f"cannot read {tmp_path / name}"):
            load_checkpoint(str(tmp_path / name), "cpu")


def test_the_sampler_and_the_exporter_load_neither_the_trainer_nor_parallel():
    code = "import sys, sample, export_hf; print(sorted({'train', 'parallel'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
