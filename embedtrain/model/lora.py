"""LoRA adapters on the bidirectional backbone (model.lora): the base is frozen and every targeted
projection W x becomes W x + (alpha / r) B A dropout(x), with A (r, in) and B (out, r) trained.

peft injects the layers in place (`inject_adapter_in_model`), so the backbone stays a
LlamaBidirectionalModel: the targeted weight moves to `<module>.base_layer.weight` and the adapter
lives in `<module>.lora_A.default.weight` / `<module>.lora_B.default.weight`. B starts at zero, so
the adapted model starts as the base.

The adapter folder is peft's own format (adapter_model.safetensors + adapter_config.json), loadable
with `peft.PeftModel.from_pretrained(base, folder)` where `base` is the bidirectional backbone
(`embedtrain.model.load_backbone(path)`): keys `base_model.model.<module>.lora_A.weight`.

A head built beside the backbone with no pretrained weights to adapt (a multi-vector model's token
projection) is trained in full next to the adapter, as peft does for its `modules_to_save` ("modules
apart from adapter layers to be set as trainable and saved in the final checkpoint", peft's
LoraConfig) and NV-Embed (Lee et al. 2024, arXiv 2405.17428) for its new latent-attention pooling
layer on a LoRA-tuned Mistral-7B. Its weights go to a file of their own, trained_head.safetensors
(training names, fp32), so that the adapter folder stays what peft loads onto the bare backbone.
This module holds no distributed code; train/checkpoint.py gathers the ZeRO-3 partitions.
"""

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_NAME = "default"  # peft's name for the one adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_KEY_PREFIX = "base_model.model."  # what PeftModel.save_pretrained writes in front of module names
LORA_PARAMETER = re.compile(rf"\.lora_([AB])\.{ADAPTER_NAME}\.weight$")
# next to the adapter in a checkpoint: the base it was trained on (peft warns about unknown keys
# in adapter_config.json, so embedtrain's own record is a file of its own)
ADAPTER_BASE = "adapter_base.json"
# next to the adapter: the trained parameters outside the backbone (trained_parameters), by training name
HEAD_WEIGHTS = "trained_head.safetensors"
BACKBONE_PREFIX = "backbone."  # the backbone's parameters in the trained module (kinds' build_module)


def peft_config(lora, base_path=None, inference_mode=False):
    """The peft LoraConfig of a resolved model.lora (config.resolve_lora)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
        task_type="FEATURE_EXTRACTION",
        base_model_name_or_path=None if base_path is None else str(base_path),
        inference_mode=inference_mode,
    )


def add_lora(backbone, lora, seed):
    """Inject LoRA layers into `backbone` in place and freeze everything else; returns it.

    The adapter's initial values come from a generator seeded with `seed` alone (A: peft's Kaiming
    init, B: zeros), so every rank and a plain reference build the same adapter; the caller's RNG
    stream is left where it was. Under ZeRO-3 the base weights may already be partitioned: peft
    reads in/out features from the Linear modules, not from their (empty) weights.
    """
    from peft import inject_adapter_in_model

    # peft builds the adapter on the host, then moves it to the base's device: seed the host RNG
    # only (torch.manual_seed would also reset every GPU's, giving all ranks the same dropout)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        inject_adapter_in_model(peft_config(lora), backbone, adapter_name=ADAPTER_NAME)
    for name, param in backbone.named_parameters():
        param.requires_grad_(bool(LORA_PARAMETER.search(name)))
    if not any(param.requires_grad for param in backbone.parameters()):
        raise ValueError(f"model.lora.target_modules {lora['target_modules']} matched no module of the backbone")
    return backbone


def lora_parameters(module):
    """(name, parameter) of every LoRA A and B weight under `module`, in module order."""
    return [(name, param) for name, param in module.named_parameters() if LORA_PARAMETER.search(name)]


def head_parameters(module):
    """(name, parameter) of every trained parameter of `module` outside its backbone (a multi-vector
    projection: `head.linear.weight`), trained in full beside the adapter; [] for a plain encoder."""
    return [
        (name, param)
        for name, param in module.named_parameters()
        if param.requires_grad and not name.startswith(BACKBONE_PREFIX)
    ]


def trained_parameters(module):
    """(name, parameter) of what a LoRA run trains: the adapter, then any head outside the backbone."""
    return lora_parameters(module) + head_parameters(module)


def adapter_key(name):
    """A training parameter name (`backbone.layers.0.self_attn.q_proj.lora_A.default.weight`, with
    or without the `backbone.` prefix) -> peft's saved key
    (`base_model.model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    name = name.removeprefix("backbone.")
    return ADAPTER_KEY_PREFIX + LORA_PARAMETER.sub(lambda m: f".lora_{m.group(1)}.weight", name)


def write_adapter(folder, tensors, lora, base_path, fingerprint=None):
    """adapter_model.safetensors (fp32, peft's keys) + adapter_config.json into `folder`, and the
    trained head (HEAD_WEIGHTS, training names) when there is one.
    `tensors`: {training parameter name: full tensor} (trained_parameters')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def fp32(tensor):
        return tensor.detach().to("cpu", torch.float32).contiguous()

    weights = {adapter_key(name): fp32(tensor) for name, tensor in tensors.items() if LORA_PARAMETER.search(name)}
    head = {name: fp32(tensor) for name, tensor in tensors.items() if not LORA_PARAMETER.search(name)}
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if head:
        save_file(head, str(folder / HEAD_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(lora, base_path, inference_mode=True).to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if fingerprint is not None:
        record = {"base_model": str(base_path), "fingerprint": fingerprint}
        (folder / ADAPTER_BASE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def read_adapter(folder):
    """(tensors by peft key, adapter_config dict) of an adapter folder."""
    folder = Path(folder)
    return load_file(str(folder / ADAPTER_WEIGHTS)), json.loads((folder / ADAPTER_CONFIG).read_text())


def read_head(folder):
    """{training name: fp32 tensor} of the head trained beside the adapter in a checkpoint folder
    (write_adapter); {} when the run trained the adapter alone."""
    path = Path(folder) / HEAD_WEIGHTS
    return load_file(str(path)) if path.is_file() else {}


def recorded_base(folder):
    """{"base_model", "fingerprint"} of the base an adapter in a checkpoint folder was trained on."""
    path = Path(folder) / ADAPTER_BASE
    return json.loads(path.read_text()) if path.is_file() else {}


def merge_lora(named_weights, adapter, scaling):
    """Yield (name, W + scaling B A) for backbone weights (name, W) as they arrive; untargeted weights
    pass through. `adapter`: peft keys -> tensors. Every adapter pair must find its weight, or the
    adapter does not belong to this base (ValueError)."""
    unused = {key.rsplit(".lora_A.", 1)[0] for key in adapter if ".lora_A." in key}
    for name, weight in named_weights:
        module = ADAPTER_KEY_PREFIX + name.removesuffix(".weight")
        if name.endswith(".weight") and module in unused:
            a = adapter[f"{module}.lora_A.weight"].float()
            b = adapter[f"{module}.lora_B.weight"].float()
            weight = weight.float() + scaling * (b @ a)
            unused.discard(module)
        yield name, weight
    if unused:
        missing = sorted(unused)
        raise ValueError(f"the adapter targets modules the base model lacks: {', '.join(missing[:3])}")


def backbone_parameter_names(path):
    """The parameter names of the bidirectional backbone of a checkpoint folder (what a full
    fine-tune exports), from its config alone (a meta-device model: no memory, no weights read)."""
    from embedtrain.model.encoder import read_model_config
    from embedtrain.model.families import family_of

    config = read_model_config(path)
    with torch.device("meta"):
        model = family_of(config.model_type).model_class(config)
    return [name for name, _ in model.named_parameters()]


class BaseWeights:
    """The backbone weights of a base checkpoint folder (safetensors, sharded or not, or *.bin), read
    one tensor at a time, under backbone names: a causal LM's `model.` prefix is dropped and its
    lm_head (a reranker's score head) ignored, as load_backbone does."""

    def __init__(self, path):
        self.path = Path(path)
        names = backbone_parameter_names(self.path)
        wanted = set(names)
        self.where = {}  # backbone name -> (file, stored key)
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
        for file in files:
            for key in self._keys(file):
                name = key if key in wanted else key.removeprefix("model.")
                if name in wanted:
                    self.where[name] = (file, key)
        missing = [name for name in names if name not in self.where]
        if missing:
            raise ValueError(
                f"{self.path} lacks backbone weights: {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            )
        self.names = names

    @staticmethod
    def _keys(file):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        return list(torch.load(file, map_location="cpu", weights_only=True, mmap=True))

    def items(self, ends=False):
        """Yield (name, tensor) file by file, one file open at a time; with `ends`, only the first
        and last rows of each tensor are read (the fingerprint)."""
        by_file = {}
        for name in self.names:
            by_file.setdefault(self.where[name][0], []).append(name)
        for file, names in by_file.items():
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    for name in names:
                        part = f.get_slice(self.where[name][1])
                        rows = part.get_shape()[0]
                        yield name, torch.cat([part[:1], part[rows - 1 :]]) if ends else part[:]
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for name in names:
                    tensor = state[self.where[name][1]]
                    yield name, torch.cat([tensor[:1], tensor[-1:]]) if ends else tensor


def base_fingerprint(path):
    """A cheap identity of a base model's weights: SHA-256 over every backbone tensor's name, shape
    and first and last rows, as fp32 (a few MB read for 8B; the same for any file layout or
    sharding). Another checkpoint, or another fine-tune of the same architecture, gives another
    value; it is a guard against merging an adapter into the wrong base, not a proof of equality."""
    digest = hashlib.sha256()
    for name, first_last in BaseWeights(path).items(ends=True):
        digest.update(f"{name}:{tuple(first_last.shape[1:])}".encode())
        digest.update(first_last.float().contiguous().numpy().tobytes())
    return digest.hexdigest()
