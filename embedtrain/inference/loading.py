"""Loading an exported folder onto a device and dtype: what kind of model a folder holds (embedding,
reranker, LoRA adapter), the device and dtype a user's "auto" means, and the parts the inference
objects hold (embedtrain.inference.api): the eval-mode module, its tokenizer and what the export
recorded with it (prompts and max_seq_length; a reranker's pair template and pair max length).

Loads with embedtrain's own classes (no trust_remote_code) and runs the bidirectional self-check
(model/encoder.py) on the loaded backbone: a causal path would give silently wrong vectors.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from embedtrain.errors import EncodeError, ModelError
from embedtrain.model.distill import TeacherSpaceEncoder
from embedtrain.model.encoder import Encoder, check_bidirectional, load_backbone, load_tokenizer
from embedtrain.model.reranker import PairScorer, is_reranker_folder, saved_head
from embedtrain.prompts import MODEL_METADATA, model_policy

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PAIR_TEMPLATE = "question:{query} \n \n passage:{passage}"  # config.DataConfig.pair_template's default


def resolve_device(device=None):
    """A torch.device for "auto"/None (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    "auto" and "cuda" pick the GPU of this process's LOCAL_RANK, so that each rank of a
    torchrun/deepspeed launch uses its own GPU."""
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device)
    if not DEVICE_PATTERN.fullmatch(name):
        raise EncodeError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EncodeError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def resolve_dtype(dtype=None, device="cpu"):
    """A torch dtype for "auto"/None (bfloat16 on CUDA, float32 on CPU) or a dtype name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EncodeError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_kind(path):
    """What a folder given as a model holds, the one classification every loader uses (encode, eval,
    mine, rerank, BiEncoder/Reranker.from_pretrained): "reranker", "multi_vector" (a ColBERT model,
    embedtrain/export_multi_vector.py), "sparse" (a SPLADE model, embedtrain/export_sparse.py),
    "adapter" (a LoRA adapter exported alone), "embedding", "run" (a training run folder, its
    checkpoints folder or one of its step folders: not loadable until exported), "missing" (not a
    folder) or "unknown" (a folder without config.json, so no model of any kind)."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    if is_run_folder(path):
        return "run"
    if is_reranker_folder(path):
        return "reranker"
    if is_multi_vector_folder(path):
        return "multi_vector"
    if is_sparse_folder(path):
        return "sparse"
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return "adapter"
    if not (path / "config.json").is_file():
        return "unknown"
    return "embedding"


def is_multi_vector_folder(path):
    """Whether a model folder holds a multi-vector (ColBERT) model: sentence-transformers'
    config_sentence_transformers.json names MultiVectorEncoder (embedtrain/export_multi_vector.py)."""
    st_config = Path(path) / "config_sentence_transformers.json"
    return st_config.is_file() and json.loads(st_config.read_text()).get("model_type") == "MultiVectorEncoder"


def is_sparse_folder(path):
    """Whether a model folder holds a sparse (SPLADE) model: sentence-transformers'
    config_sentence_transformers.json names SparseEncoder (embedtrain/export_sparse.py)."""
    st_config = Path(path) / "config_sentence_transformers.json"
    return st_config.is_file() and json.loads(st_config.read_text()).get("model_type") == "SparseEncoder"


def is_run_folder(path):
    """A training run folder (checkpoints/), its checkpoints folder (`latest`) or a checkpoint step
    folder (complete.json or base_model/ next to the DeepSpeed state): what `embedtrain export`
    takes, never an exported model (an export has none of these)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() or (path / "latest").is_file() or (path / "complete.json").is_file():
        return True
    return path.name.startswith("step_") and (path / "base_model").is_dir()


KIND_USES = {
    "embedding": "an embedding model (bi-encoder): it embeds texts and does not score pairs; use it with "
    "embedtrain encode / eval / mine or embedtrain.BiEncoder.from_pretrained",
    "reranker": "a reranker (cross-encoder): it scores (query, passage) pairs and does not embed texts; use it "
    "with embedtrain rerank, eval/mine --rerank or embedtrain.Reranker.from_pretrained",
    "multi_vector": "a multi-vector (ColBERT) model: it embeds every token and scores by MaxSim; use it with "
    "embedtrain encode / eval / mine or embedtrain.MultiVectorEncoder.from_pretrained",
    "sparse": "a sparse (SPLADE) model: it weighs vocabulary terms and scores by dot product; use it with "
    "embedtrain encode / eval or embedtrain.SparseEncoder.from_pretrained",
    "adapter": "a LoRA adapter without its base (embedtrain export --adapter-only): export the run merged "
    "(embedtrain export RUN OUT) to encode with it, or load it with peft on the base",
}


def not_a_model(path, found, option):
    """The one-line message for a folder that holds no model of any kind: what it is and the fix."""
    if found == "run":
        return (
            f"{option} {path} is a training run folder, not an exported model: export it first: "
            f"`embedtrain export {path} OUT`, then give OUT"
        )
    if found == "missing":
        return f"{option} {path} is not a folder: give the folder `embedtrain export RUN OUT` wrote"
    return (
        f"{option} {path} has no config.json, so it is not an exported model folder: give the folder "
        "`embedtrain export RUN OUT` wrote (config.json, model.safetensors, tokenizer)"
    )


def require_kind(path, kind, option):
    """Refuse a folder that is not a model of `kind`, before anything loads: a run folder or a folder
    without config.json with a ModelError saying what it is and the fix (export it first), a model of
    the other kind with an EncodeError saying which kind it is and what takes it. `option` names the
    argument in the message (MODEL, --rerank, model)."""
    found = model_kind(path)
    if found in ("run", "missing", "unknown"):
        raise ModelError(not_a_model(path, found, option))
    if found != kind:
        raise EncodeError(f"{option} {path} is {KIND_USES[found]}")


def kept_projection(model_dir):
    """A distilled student's projection kept at export (`export --keep-projection`: embedtrain.json
    "projection" and its sentence-transformers Dense folder) as an fp32 Linear, else None."""
    metadata_file = Path(model_dir) / MODEL_METADATA
    entry = json.loads(metadata_file.read_text()).get("projection") if metadata_file.is_file() else None
    if entry is None:
        return None
    weights_file = Path(model_dir) / entry["path"] / "model.safetensors"
    if not weights_file.is_file():
        raise EncodeError(f"{model_dir}: {MODEL_METADATA} names a projection, but {weights_file} is missing")
    tensors = load_file(str(weights_file))
    projection = torch.nn.Linear(entry["in_features"], entry["out_features"], bias=True)
    projection.load_state_dict({"weight": tensors["linear.weight"], "bias": tensors["linear.bias"]})
    return projection


def folder_tokenizer(model_dir):
    """The export's tokenizer, padded on the side its tokenizer_config.json records."""
    tokenizer_config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    return load_tokenizer(model_dir, tokenizer_config.get("padding_side", "right"))


def encoder_parts(model_dir, dtype=None, device=None):
    """The keyword arguments of embedtrain.inference.BiEncoder for an exported embedding folder:
    module (an Encoder, or a TeacherSpaceEncoder when the distillation projection was kept, in eval
    mode on `device` in `dtype`), tokenizer, prompt_policy, max_seq_length and name_or_path. A
    reranker folder is refused: its backbone would load and embed, silently, without its head."""
    model_dir = Path(model_dir)
    require_kind(model_dir, "embedding", "model")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = json.loads((model_dir / "config.json").read_text())
    backbone, pooling = load_backbone(model_dir, dtype=dtype), config.get("pooling", "avg")
    projection = kept_projection(model_dir)
    if projection is None:
        module = Encoder(backbone, pooling=pooling)
    else:
        module = TeacherSpaceEncoder(backbone, pooling=pooling, projection=projection)
    module.eval().to(device)
    check_bidirectional(module.backbone)  # a causal path would encode silently wrong vectors
    bert_config = model_dir / "sentence_bert_config.json"
    return {
        "module": module,
        "tokenizer": folder_tokenizer(model_dir),
        "prompt_policy": model_policy(model_dir),
        "max_seq_length": json.loads(bert_config.read_text())["max_seq_length"] if bert_config.is_file() else 512,
        "name_or_path": str(model_dir),
    }


def reranker_parts(model_dir, dtype=None, device=None):
    """The keyword arguments of embedtrain.inference.Reranker for an exported reranker folder: module
    (a PairScorer with its saved head, in eval mode on `device` in `dtype`), tokenizer,
    pair_template and max_length (the pair max length the run trained with, recorded in
    embedtrain.json) and name_or_path."""
    model_dir = Path(model_dir)
    require_kind(model_dir, "reranker", "model")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = json.loads((model_dir / "config.json").read_text())
    metadata_file = model_dir / MODEL_METADATA
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    backbone = load_backbone(model_dir, dtype=dtype)
    head = saved_head(model_dir, config["hidden_size"], dtype)
    module = PairScorer(backbone, config.get("pooling", "avg"), config.get("temperature", 1.0), head)
    module.eval().to(device)
    check_bidirectional(module.backbone)
    return {
        "module": module,
        "tokenizer": folder_tokenizer(model_dir),
        "pair_template": metadata.get("pair_template", DEFAULT_PAIR_TEMPLATE),
        "max_length": metadata.get("pair_max_length", 512),
        "name_or_path": str(model_dir),
    }
