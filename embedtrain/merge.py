"""Model merging: `embedtrain merge OUT MODEL...` averages exported models in fp32.

The 8B paper's final model is the uniform average of 6 runs. Inputs must share config.json (up to
bookkeeping keys) and tensor names and shapes; anything else is refused with the difference named.
Tensors are read one at a time (safetensors), so memory stays at about one output shard.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from embedtrain.errors import MergeError
from embedtrain.export import write_shards
from embedtrain.file_modes import published_folder

IGNORED_CONFIG_KEYS = ("_name_or_path", "dtype", "torch_dtype", "transformers_version")


def weight_files(folder):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / f for name, f in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise MergeError(f"{folder} has no model.safetensors (not an exported model?)")
    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}


def comparable_config(folder):
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}


def check_compatible(models):
    reference = comparable_config(models[0])
    reference_files = weight_files(models[0])
    for other in models[1:]:
        config = comparable_config(other)
        differing = sorted(k for k in set(reference) | set(config) if reference.get(k) != config.get(k))
        if differing:
            raise MergeError(f"{other} differs from {models[0]} in config.json: {', '.join(differing)}")
        files = weight_files(other)
        if files.keys() != reference_files.keys():
            missing = sorted(set(reference_files) ^ set(files))[:5]
            raise MergeError(f"{other} and {models[0]} hold different tensors (e.g. {', '.join(missing)})")
    return reference_files


def read_tensor(files, name):
    with safe_open(str(files[name]), "pt") as f:
        return f.get_tensor(name)


def merge(out, models, weights=None, dtype="float32", overwrite=False, max_shard_gb=5.0):
    models = [Path(m) for m in models]
    if len(models) < 2:
        raise MergeError("merge needs at least two models")
    weights = [1.0 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models) or abs(sum(weights) - 1.0) > 1e-6:
        raise MergeError(f"--weights: {len(models)} weights summing to 1 expected, got {weights}")
    names = list(check_compatible(models))
    files = [weight_files(m) for m in models]

    def averaged():
        for name in names:
            yield name, sum(w * read_tensor(f, name).to(torch.float32) for w, f in zip(weights, files))

    with published_folder(out, overwrite) as tmp:  # as an export's: complete or absent, the user's umask
        shutil.copytree(
            models[0],
            tmp,
            ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"),
            dirs_exist_ok=True,
        )
        write_shards(
            averaged(), tmp, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype], int(max_shard_gb * 2**30)
        )
        (tmp / "merge.json").write_text(json.dumps({"models": [str(m) for m in models], "weights": weights}, indent=2))
    return Path(out)


def merge_command(out, models, weights=None, dtype="float32", overwrite=False):
    """`embedtrain merge`: `weights` as given to --weights (comma-separated, or None for uniform),
    merged and a line saying what was written."""
    merge(out, models, weights.split(",") if weights else None, dtype, overwrite)
    print(f"merged {len(models)} models into {out}", flush=True)
