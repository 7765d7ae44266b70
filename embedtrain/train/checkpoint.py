"""Checkpoints: <run>/checkpoints/step_<N>/ holds the DeepSpeed state (model, optimizer,
scheduler), the data stream position, RNG states and the resolved config; DeepSpeed writes
<run>/checkpoints/latest after the step folder is complete."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml


def write_base_model(run_dir, backbone_config, tokenizer, prompts):
    """<run>/base_model: the backbone config, tokenizer and prompts, copied into every checkpoint
    so that an export needs nothing but the checkpoint folder."""
    folder = Path(run_dir) / "base_model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    config = backbone_config.to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder)
    # Record the pad token side for consumers (not every transformers release writes it), and name a
    # tokenizer class that transformers 4.x also knows.
    tokenizer_config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    tokenizer_config.update(padding_side=tokenizer.padding_side, pad_token=tokenizer.pad_token,
                            tokenizer_class="PreTrainedTokenizerFast")
    tokenizer_config_file.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    return folder


def checkpoint_root(run_dir):
    return Path(run_dir) / "checkpoints"


class CheckpointError(ValueError):
    """A partial, corrupt or foreign checkpoint; the message names the file."""


def rng_state():
    """RNG states as plain lists and tensors, so that checkpoints load with weights_only=True."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def safe_globals():
    """The non-tensor classes DeepSpeed pickles into its checkpoint files; nothing else may load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


def load_checkpoint_file(path):
    """torch.load with weights_only=True (plus DeepSpeed's two classes), memory-mapped."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"cannot read checkpoint file {path}: {err}") from err


def save_checkpoint(engine, run_dir, step, stream_state, config_dict):
    """Every rank calls this (ZeRO shards are per rank)."""
    tag = f"step_{step}"
    engine.save_checkpoint(str(checkpoint_root(run_dir)), tag=tag,
                           client_state={"step": step, "stream": stream_state, "rng": rng_state()})
    folder = checkpoint_root(run_dir) / tag
    if engine.global_rank == 0:
        (folder / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
        (folder / "stream.json").write_text(json.dumps(stream_state, indent=2))
        shutil.copytree(Path(run_dir) / "base_model", folder / "base_model", dirs_exist_ok=True)
    return folder


def resolve_checkpoint(path):
    """A run folder, a checkpoints folder or a step folder -> (checkpoints root, tag)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        return path, tag
    if path.is_dir() and path.name.startswith("step_"):
        return path.parent, path.name
    raise CheckpointError(f"{path} is not a run folder, a checkpoints folder or a checkpoint step folder "
                     "(no checkpoints/, no latest file, not step_<N>)")
