"""
configurator.py: what every entry script settles before it runs: its configuration, its device, its precision.

    config = load_config(DEFAULTS, sys.argv[1:])   # config/*.py files, then --key=value overrides
    device = resolve_device(config["device"])       # "auto" -> cuda if there is one, else cpu

The one idea: a configuration is a flat dict of named defaults that config files (plain Python, executed)
and `--key=value` arguments (Python literals) may only *change*, never extend: a key that does not exist
or a value of another type is an error naming the key, so a typo such as --learing_rate=1e-3 stops the run
instead of being silently ignored (nanoGPT's configurator, with the checks it lacks).
"""

import ast
import os

import torch


def read_config_file(path: str) -> dict:
    """The settings a config file makes: its public names holding plain values (int, float, bool, str, dict)."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file '{path}' does not exist")
    namespace = {}
    with open(path) as f:
        exec(f.read(), namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, dict))}


def load_config(defaults: dict, argv: list[str]) -> dict:
    """Config files (executed as Python) and --key=value overrides, applied in order.

    Every key must already exist and keep its type: a typo such as --learing_rate=1e-3 is an error,
    never a silently ignored setting. An int is accepted where a float is expected.
    """
    config = dict(defaults)

    def set_key(key, value, where):
        if key not in config:
            raise SystemExit(f"{where}: unknown config key '{key}'")
        expected = type(config[key])
        if expected is float and type(value) is int:
            value = float(value)
        if type(value) is not expected:
            raise SystemExit(f"{where}: config key '{key}' must be {expected.__name__}, got {value!r}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"override '{arg}' must look like --key=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word such as --device=cpu is a string
            set_key(key, value, arg)
        else:
            for key, value in read_config_file(arg).items():
                set_key(key, value, arg)
    return config


def resolve_device(name: str, local_rank: int = 0) -> str:
    """"auto" is this process's GPU (cuda:local_rank under torchrun) when there is one, else the CPU; "cpu", "cuda"
    and "cuda:N" are checked against what this machine has, so a missing GPU is a sentence, not a crash later."""
    if name == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device={name} but this machine has no CUDA GPU that torch can use: use device=cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"device={name} but this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """"auto" is bfloat16 on a GPU that has it, else float32: bf16 autocast on a CPU without AMX is emulated
    and ~15x slower than fp32."""
    if name == "auto":
        name = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"dtype must be auto, float32, bfloat16 or float16, got '{name}'")
    return getattr(torch, name)


def peak_flops(device_type: str, dtype: torch.dtype) -> float | None:
    """Dense bf16 tensor-core peak of the GPU, for MFU (model FLOPs utilisation, PaLM appendix B).
    Unknown devices (and the CPU) report no MFU rather than a made-up one."""
    if device_type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name()
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "4090": 165e12}
    for key, flops in table.items():
        if key in name:
            return flops
    return None
