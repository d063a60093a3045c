"""configurator.py: config files then overrides, in order; a key that does not exist or a value of another type is
an error naming the key (the command-line side of these rules: tests/test_train.py)."""

import os

import pytest

from configurator import load_config, read_config_file, resolve_device, resolve_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"n_layer": 8, "learning_rate": 6e-4, "device": "auto", "compile": False, "rope_scaling": {}}


def test_config_file_then_overrides_in_order(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 3\nlearning_rate = 1e-3\n_private = 'ignored'\nimport math\n")
    config = load_config(DEFAULTS, [str(cfg), "--learning_rate=2", "--device=cpu", "--compile=True"])
    assert config["n_layer"] == 3
    assert config["learning_rate"] == 2.0 and type(config["learning_rate"]) is float  # int accepted for float
    assert config["device"] == "cpu" and config["compile"] is True
    assert load_config(DEFAULTS, ["--learning_rate=2", str(cfg)])["learning_rate"] == 1e-3  # the later one wins
    assert DEFAULTS["n_layer"] == 8  # the defaults themselves are never changed


def test_rope_scaling_is_a_dict_from_the_command_line_or_a_file(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    assert load_config(DEFAULTS, [f"--rope_scaling={yarn}"])["rope_scaling"] == yarn
    cfg = tmp_path / "c.py"
    cfg.write_text("rope_scaling = {'rope_type': 'linear', 'factor': 2.0}\n")
    assert load_config(DEFAULTS, [f"--rope_scaling={yarn}", str(cfg)])["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("args, message", [
    (["--learing_rate=1e-3"], "unknown config key 'learing_rate'"),
    (["--rope_scaling=yarn"], "config key 'rope_scaling' must be dict"),
    (["--n_layer=2.5"], "config key 'n_layer' must be int"),
    (["--compile=1"], "config key 'compile' must be bool"),
    (["--n_layer"], "must look like --key=value"),
    (["config/does_not_exist.py"], "config file 'config/does_not_exist.py' does not exist"),
])
def test_bad_config_is_one_clear_error(args, message):
    with pytest.raises(SystemExit, match=message):
        load_config(DEFAULTS, args)


def test_a_config_file_keeps_only_its_public_plain_values(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import os\nn_layer = 2\n_hidden = 1\ndef f():\n    pass\nname = 'x'\n")
    assert read_config_file(str(cfg)) == {"n_layer": 2, "name": "x"}


def test_auto_device_is_this_ranks_gpu_or_the_cpu_and_dtype_is_checked():
    import torch

    assert resolve_device("auto", local_rank=3) == ("cuda:3" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(SystemExit, match="dtype must be auto, float32, bfloat16 or float16, got 'fp8'"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "config"))))
def test_every_shipped_config_file_sets_only_train_keys_of_their_types(name, trained_ckpt, tmp_path):
    import train

    config = load_config(train.DEFAULTS, [os.path.join(ROOT, "config", name)])
    # init_from, teacher and the pair files name what their README commands make first: here, scratch (a run there
    # is for grpo and dpo, which refuse scratch) and files there are.
    (tmp_path / "pairs.jsonl").write_text("")
    start = trained_ckpt if config["objective"] in ("grpo", "dpo") else "scratch"
    train.check_config({**config, "init_from": start, "teacher": config["teacher"] and trained_ckpt,
                        "dpo_pairs": config["dpo_pairs"] and str(tmp_path / "pairs.jsonl"),
                        "dpo_val_pairs": config["dpo_val_pairs"] and str(tmp_path / "pairs.jsonl")}, world_size=1)
