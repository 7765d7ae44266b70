"""What every export format writes the same way: the backbone's weights as safetensors shards
(`write_shards`), its config.json (`hf_config_dict`; weights, config and modeling file together:
`write_model`), its tokenizer with the padding side recorded (`save_tokenizer`), JSON files
(`write_json`) and the name of the modeling file shipped beside Llama exports (`MODELING_FILE`, a
copy of embedtrain/model/bidirectional.py). Below export.py and the format writers it names
(export_multi_vector.py, export_sparse.py), which import these from here.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from embedtrain.model import bidirectional
from embedtrain.model.encoder import load_tokenizer
from embedtrain.model.families import family_of

MODELING_FILE = "llama_bidirectional_model.py"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # an export's dtype option


def hf_config_dict(model_config):
    """config.json contents. Llama: `llama_bidirec` with the modeling file (auto_map); also writes
    rope_theta / rope_scaling at the top level: transformers 4.x does not read 5.x's rope_parameters
    and would silently fall back to its default theta. Other families: their stock model_type and
    model class with is_causal false, no remote code (embedtrain.model.families)."""
    config = dict(model_config)
    family = family_of(config.get("model_type"))
    config["architectures"] = [family.architecture]
    config["is_causal"] = False
    if family.stock_export:
        return config
    config["model_type"] = "llama_bidirec"
    config["auto_map"] = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.LlamaBidirectionalConfig",
        "AutoModel": f"{MODELING_FILE[:-3]}.LlamaBidirectionalModel",
    }
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    return config


def write_shards(named_tensors, folder, dtype, max_shard_bytes):
    """Write safetensors shards of at most `max_shard_bytes` as tensors arrive; index if several."""
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"shard-{len(shards):05d}.tmp"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    total = 0
    for name, tensor in named_tensors:
        tensor = tensor.to(dtype).contiguous()
        if size and size + tensor.nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    for index, (tmp, names) in enumerate(shards):
        final = "model.safetensors" if len(shards) == 1 else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / tmp).rename(folder / final)
        weight_map.update({n: final for n in names})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def write_json(path, value, sort_keys=False):
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=sort_keys) + "\n")


def write_model(named_tensors, config, folder, dtype, max_shard_gb):
    """A model's weights and config.json in `folder`: the (name, tensor) pairs as safetensors shards
    of at most `max_shard_gb` GB in `dtype` (EXPORT_DTYPES), `config` with that dtype recorded, and
    the modeling file when the config's auto_map names it (Llama's own classes; the stock families
    need no remote code). Returns the config written."""
    write_shards(named_tensors, folder, EXPORT_DTYPES[dtype], int(max_shard_gb * 2**30))
    config = {**config, "dtype": dtype}
    write_json(Path(folder) / "config.json", config, sort_keys=True)
    if "auto_map" in config:
        shutil.copyfile(bidirectional.__file__, Path(folder) / MODELING_FILE)
    return config


def save_tokenizer(backbone_folder, folder, padding_side=None):
    """The backbone's tokenizer saved into `folder` with its padding side written in
    tokenizer_config.json (transformers 5 leaves it out): `padding_side`, else the backbone's own,
    else right. Returns the tokenizer."""
    tokenizer_config = Path(backbone_folder) / "tokenizer_config.json"
    side = padding_side or (
        json.loads(tokenizer_config.read_text()).get("padding_side") if tokenizer_config.is_file() else None
    )
    tokenizer = load_tokenizer(backbone_folder, side or "right")
    tokenizer.save_pretrained(folder)
    saved = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    write_json(Path(folder) / "tokenizer_config.json", {**saved, "padding_side": tokenizer.padding_side})
    return tokenizer
