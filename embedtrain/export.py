"""ZeRO checkpoint -> Hugging Face folder in the format of NVIDIA's released embedding models:
safetensors backbone weights (no lm_head), config.json with model_type llama_bidirec, auto_map,
pooling and temperature, the modeling file next to the weights, and the tokenizer with its pad
token and padding side."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from embedtrain.model import bidirectional
from embedtrain.train.checkpoint import resolve_checkpoint

MODELING_FILE = "llama_bidirectional_model.py"
BACKBONE_PREFIX = "backbone."


def hf_config_dict(model_config):
    """config.json contents. Also writes rope_theta / rope_scaling at the top level: transformers 4.x
    does not read 5.x's rope_parameters and would silently fall back to its default theta."""
    config = dict(model_config)
    config["model_type"] = "llama_bidirec"
    config["architectures"] = ["LlamaBidirectionalModel"]
    config["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.LlamaBidirectionalConfig",
                          "AutoModel": f"{MODELING_FILE[:-3]}.LlamaBidirectionalModel"}
    config["is_causal"] = False
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    return config


def load_consolidated_state(checkpoint_root, tag):
    """fp32 backbone weights from the ZeRO partitions of every rank, with the `backbone.` prefix
    of the training module removed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(checkpoint_root) / tag
    if not any(folder.glob("*model_states.pt")):
        raise ValueError(f"{folder} holds no DeepSpeed model states (*model_states.pt): incomplete checkpoint?")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=tag)
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    if not backbone:
        raise ValueError(f"{folder}: no '{BACKBONE_PREFIX}*' weights in the checkpoint (not an embedtrain run?)")
    return backbone


def export_checkpoint(source, out, dtype="float32", overwrite=False):
    checkpoint_root, tag = resolve_checkpoint(source)
    step_folder = checkpoint_root / tag
    base = step_folder / "base_model"
    if not (base / "config.json").is_file():
        raise ValueError(f"{step_folder} lacks base_model/config.json: not a complete embedtrain checkpoint")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    state = load_consolidated_state(checkpoint_root, tag)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.to(torch_dtype).contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    config = hf_config_dict(json.loads((base / "config.json").read_text()))
    config["dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(bidirectional.__file__, tmp / MODELING_FILE)
    for item in base.iterdir():
        if item.name != "config.json":
            shutil.copy(item, tmp / item.name)
    tmp.rename(out)  # the folder appears complete or not at all
    return out
