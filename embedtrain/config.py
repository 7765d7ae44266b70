"""The typed config tree. A run's config = a YAML recipe, then `--set a.b=c` overrides on top.

Every key is declared here with its type and default; an unknown key or a wrong type is an error
that names the key (with a did-you-mean). One owner per setting: ZeRO stage, offload, precision and
gradient clipping live in the DeepSpeed JSON named by `deepspeed.config`; `deepspeed.<key>=value`
overrides a key of that JSON. Everything else lives here.
"""

import dataclasses
import difflib
import json
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from embedtrain.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
RECIPES_DIR = PACKAGE_DIR / "recipes"
# installed: embedtrain/ds_configs (setup.py maps the top-level folder there); from a checkout: ds_configs/
DS_CONFIGS_DIR = next(
    (d for d in (PACKAGE_DIR / "ds_configs", PACKAGE_DIR.parent / "ds_configs") if d.is_dir()),
    PACKAGE_DIR.parent / "ds_configs",
)
ASSET_PREFIX = "assets:"


@dataclass
class ModelConfig:
    path: str = ""  # local checkpoint folder; "assets:NAME" is a folder shipped with embedtrain
    # embedding (bi-encoder) | reranker (cross-encoder: one score per pair) | multi_vector (ColBERT: one
    # vector per token, MaxSim) | sparse (SPLADE: one weight per vocabulary term)
    kind: str = "embedding"
    pooling: str = "avg"  # avg | cls | last | weighted_avg
    normalize: bool = True
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flex_attention (block-sparse packed rows)
    padding_side: str = "right"  # right | left (the 8B release pads left)
    liger_kernels: bool = False  # fused RMSNorm, SwiGLU and RoPE from liger-kernel (CUDA; optional extra)
    # LoRA adapters on a frozen base (peft; `pip install embedtrain[lora]`): None = full fine-tuning;
    # {r, alpha, dropout, target_modules}, omitted keys from LORA_DEFAULTS ({} = all defaults)
    lora: dict | None = None
    # model.kind=multi_vector: its settings (embedtrain.config.resolve_multi_vector; {} = all defaults)
    multi_vector: dict | None = None
    # model.kind=sparse: its settings (embedtrain.config.resolve_sparse; {} = all defaults)
    sparse: dict | None = None


# NV-Embed (arXiv:2405.17428, section 4.1): rank 16, alpha 32, dropout 0.1, every linear projection
# of the decoder blocks. The embeddings and norms stay frozen; the base model has no lm_head here.
LORA_DEFAULTS = {
    "r": 16,
    "alpha": 32.0,
    "dropout": 0.1,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LLAMA_PROJECTIONS = tuple(LORA_DEFAULTS["target_modules"])


@dataclass
class DataConfig:
    path: str = ""  # folder of subsets in the embed-nemotron-dataset-v1 layout
    subsets: list[str] | None = None  # None: every subset folder under path
    query_max_length: int = 512
    passage_max_length: int = 512
    query_prefix: str | None = None  # None: the subset's query_instruction
    passage_prefix: str | None = None  # None: the subset's passage_instruction
    pad_to_multiple_of: int = 8
    packing: bool = True  # padding-free batches: a micro-batch's sequences packed into rows
    # tokens per packed row; 0 = the kernel's default: on the CPU and under eager the larger max length
    # (a block mask: a row's attention costs its length squared), on CUDA one row per encoder call
    # (variable-length kernels: rows cost nothing extra, and one row leaves no slack at row ends)
    pack_length: int = 0
    mixing: str = "proportional"  # proportional | temperature | single_subset
    mixing_temperature: float = 1.0  # temperature/single_subset: P(subset) ~ n^(1/T)
    subset_weights: dict | None = None  # explicit {subset: weight}, instead of the temperature rule
    length_bucketing: bool = False  # sort each global batch by length before cutting micro-batches
    # which of a query's positives is its target: first (pos_doc[0], NVIDIA's recipe) | cycle
    # (positive e mod the query's number of positives, e = how often the stream drew it before).
    # Either way every known positive is masked out of the query's negatives, in every pool.
    positive_sampling: str = "first"
    # model.kind=reranker: each (query, passage) pair is one sequence, this template truncated to
    # pair_max_length tokens (NeMo AutoModel's cross-encoder recipe); subset instructions are not used
    pair_template: str = "question:{query} \n \n passage:{passage}"
    pair_max_length: int = 512
    num_workers: int = 1  # DataLoader worker processes per rank
    prepared_path: str | None = None  # where a raw data.path is prepared; default <run>/prepared


@dataclass
class LossConfig:
    negatives: str = "group"  # group | local | global
    hard_negatives: int = 4
    temperature: float = 0.02
    query_negatives: bool = False  # local/global pools: other queries are negatives too
    # model.kind=reranker with loss.negatives=local: each query is also scored against this many other
    # queries' positives of its micro-batch (in-batch negatives, sampled deterministically; never one
    # of its known positives). 0 = off (group); under local 0 means the default, 4
    inbatch_negatives: int = 0
    gather_group_size: int = 0  # global pool: ranks per gather group (e.g. GPUs per node); 0 = world
    matryoshka_dims: list[int] | None = None  # e.g. [384, 512, 768, 1024, 2048]: loss summed over truncations
    matryoshka_weights: list[float] | None = None  # one weight per dim; default 1 each
    # embedding distillation from a teacher's cached embeddings (`embedtrain encode TEACHER
    # --teacher-cache DATA`): None = off; {teacher_cache, contrastive, cosine, mse, kl, kl_temperature},
    # omitted keys from DISTILL_DEFAULTS
    distill: dict | None = None


# The loss weights of NeMo AutoModel's embedding distillation recipe (cosine 1 + MSE 1, no contrastive
# or KL term); KL over the pool's scores at tau 0.05 is available with its own weight.
DISTILL_DEFAULTS = {
    "teacher_cache": None,  # required: the cache folder
    "contrastive": 0.0,  # weight of the run's InfoNCE loss (loss.negatives, loss.temperature)
    "cosine": 1.0,  # 1 - cos(projected student, teacher), queries and passages
    "mse": 1.0,  # mean squared error of the same, per element
    "kl": 0.0,  # KL(teacher || student) of the softmax over the negative pool's scores
    "kl_temperature": 0.05,
}


@dataclass
class OptimConfig:
    weight_decay: float = 0.01  # not applied to norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "linear"  # linear | cosine | constant (after warm-up)
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio


@dataclass
class TrainConfig:
    global_batch_size: int = 128  # queries per optimizer step, over all ranks
    micro_batch_size: int = 1  # queries per rank per forward
    max_steps: int = 1000
    lr: float = 2e-6
    seed: int = 0
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    # minutes between checkpoints as well (rank 0's clock, shared with the stop flag); 0: off
    save_every_minutes: float = 0.0
    keep_checkpoints: int = 3  # newest complete checkpoints kept; 0: all
    resume: str = "auto"  # auto: from <output_dir>/checkpoints if any | never | a run or step folder
    # resume although a setting that decides the data order changed (data.mixing, its temperature or
    # weights, data.subsets, lengths, ...: embedtrain.train.resume_checks); false: such a resume is refused
    resume_new_data_order: bool = False
    # resume although train.max_steps or the optim.* schedule changed: the LR curve follows the new
    # settings from the resumed step on; false: such a resume is refused
    resume_new_schedule: bool = False
    max_skipped_steps: int = 20  # steps skipped for a non-finite loss or gradient before the run stops
    # steps between the ranks' non-blocking exchange of the stop (SIGTERM, Ctrl-C) and save flags;
    # a stop is acted on one exchange after the signal
    stop_check_every: int = 1
    # true (every decoder layer) | false | k (every k-th layer: 0, k, 2k, ...; 1 = every layer) | auto (the least
    # recompute that fits the card, embedtrain.autoconfig; with deepspeed.config=auto or any JSON)
    activation_checkpointing: bool | int | str = True
    compile: bool = False  # torch.compile of each decoder layer (dynamic shapes), not of the whole wrapped engine
    grad_cache_chunk_size: int = 0  # GradCache: encode the micro-batch this many queries at a time; 0 = off
    # token budget per forward (0 = off): group pool and rerankers cut each rank's share of the global
    # batch into micro-steps of whole queries holding at most this many tokens; local/global pools keep
    # micro_batch_size queries per contrastive batch and cut it into GradCache chunks of this many tokens
    micro_batch_tokens: int = 0
    output_dir: str = "runs/default"


@dataclass
class LoggingConfig:
    every: int = 10  # steps between console lines and TensorBoard points
    peak_tflops: float = 989.0  # the card's dense peak for MFU (H100 SXM bf16: 989); only the logs use it
    tensorboard: bool = True


@dataclass
class EvalConfig:
    path: str = ""  # held-out folder in the dataset's layout; "" = no in-training evaluation
    every: int = 0  # steps between evaluations (and after the last step); 0 = only after the last step
    batch_size: int = 64
    max_queries: int = 0  # per subset; 0 = all
    # model.kind=reranker: documents per held-out query in the in-training eval (its pos_doc, then
    # neg_doc up to this many; every positive is kept)
    rerank_candidates: int = 100


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # {"config": "zero3.json" | "auto", ...keys of that JSON to override}; auto: the cheapest ZeRO stage that
    # fits the card (embedtrain.autoconfig), recorded in <run>/deepspeed.json
    deepspeed: dict = field(default_factory=lambda: {"config": "zero3.json"})

    def to_dict(self):
        return dataclasses.asdict(self)


CHOICES = {
    "model.kind": ("embedding", "reranker", "multi_vector", "sparse"),
    "model.pooling": ("avg", "cls", "last", "weighted_avg"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "model.padding_side": ("right", "left"),
    "loss.negatives": ("group", "local", "global"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "data.mixing": ("proportional", "temperature", "single_subset"),
    "data.positive_sampling": ("first", "cycle"),
}

# Top-level keys of a DeepSpeed config that embedtrain lets a recipe or --set touch.
DEEPSPEED_KEYS = (
    "config",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "zero_optimization",
    "gradient_clipping",
    "steps_per_print",
    "wall_clock_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "data_types",
    "checkpoint",
    "flops_profiler",
    "comms_logger",
    "zero_force_ds_cpu_optimizer",
)


def did_you_mean(word, options):
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value, annotation, key):
    """Check (and gently convert) a value against a dataclass field type; errors name the key."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for choice in inner[:-1]:  # `bool | int | str`: the first type the value is, in order
            try:
                return _coerce(value, choice, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _apply(config, key, value, raw=None):
    """Set dotted `key` (e.g. "train.lr" or "deepspeed.bf16.enabled") on the config tree. `raw`:
    the text of a --set value, kept as is for string settings that YAML would read as something
    else (`--set data.query_prefix=query:` is the string "query:", not a mapping)."""
    parts = key.split(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if parts[0] not in sections:
        raise ConfigError(f"unknown config section {parts[0]!r} in {key!r}{did_you_mean(parts[0], sections)}")
    if parts[0] == "deepspeed":
        if len(parts) < 2:
            if not isinstance(value, dict):
                raise ConfigError("deepspeed: expected a mapping")
            for sub_key, sub_value in value.items():
                _apply(config, f"deepspeed.{sub_key}", sub_value)
            return
        if parts[1] not in DEEPSPEED_KEYS:
            raise ConfigError(f"unknown DeepSpeed key {key!r}{did_you_mean(parts[1], DEEPSPEED_KEYS)}")
        node = config.deepspeed
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a mapping")
        node[parts[-1]] = value
        return
    section = getattr(config, parts[0])
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings")
        for sub_key, sub_value in value.items():
            _apply(config, f"{key}.{sub_key}", sub_value)
        return
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    if len(parts) == 3 and parts[1] in fields and dict in (hints[parts[1]], *typing.get_args(hints[parts[1]])):
        # one entry of a mapping setting (`--set model.lora.r=8`, `--set data.subset_weights.FEVER=2`)
        setattr(section, parts[1], {**(getattr(section, parts[1]) or {}), parts[2]: value})
        return
    if len(parts) != 2 or parts[1] not in fields:
        raise ConfigError(f"unknown config key {key!r}{did_you_mean(parts[1], fields)}")
    takes_text = hints[parts[1]] is str or set(typing.get_args(hints[parts[1]])) == {str, type(None)}
    if raw is not None and takes_text and value is not None and not isinstance(value, str):
        value = raw
    value = _coerce(value, hints[parts[1]], key)
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    setattr(section, parts[1], value)


def recipe_path(recipe_or_path):
    """A shipped recipe name (tiny, llama3_2_1b, ...) or a path to a YAML file."""
    path = Path(recipe_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    shipped = RECIPES_DIR / f"{recipe_or_path}.yaml"
    if not shipped.is_file():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ConfigError(
            f"no recipe named {recipe_or_path!r}{did_you_mean(recipe_or_path, names)}; "
            f"shipped recipes: {', '.join(names)}"
        )
    return shipped


def parse_override(text):
    """'a.b=c' -> ('a.b', c) with c parsed as YAML (so 1e-5, true, [1, 2] get their types)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_path(value):
    """'assets:NAME' -> the folder shipped in embedtrain/assets; other paths as given."""
    if value.startswith(ASSET_PREFIX):
        return str(ASSETS_DIR / value[len(ASSET_PREFIX) :])
    return value


def load_config(recipe_or_path, overrides=(), output_dir=None):
    """Build the config: defaults < recipe YAML < --set overrides < --output-dir."""
    path = recipe_path(recipe_or_path)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections at the top level")
    config = Config()
    for section, values in recipe.items():
        _apply(config, section, values)
    for text in overrides:
        key, value = parse_override(text)
        _apply(config, key, value, raw=text.split("=", 1)[1])
    if output_dir is not None:
        config.train.output_dir = str(output_dir)
    config.model.path = resolve_path(config.model.path)
    config.data.path = resolve_path(config.data.path)
    config.eval.path = resolve_path(config.eval.path)
    validate(config)
    return config


def validate(config):
    """Checks that need more than one field; each error names the keys involved."""
    if not config.model.path:
        raise ConfigError("model.path is not set (a local checkpoint folder: Llama, Mistral, Ministral3 or Qwen3)")
    if not config.data.path:
        raise ConfigError("data.path is not set (a folder of subsets in the embed-nemotron-dataset-v1 layout)")
    positive = {
        "train.global_batch_size": config.train.global_batch_size,
        "train.micro_batch_size": config.train.micro_batch_size,
        "train.max_steps": config.train.max_steps,
        "loss.temperature": config.loss.temperature,
        "data.query_max_length": config.data.query_max_length,
        "data.passage_max_length": config.data.passage_max_length,
        "logging.every": config.logging.every,
        "train.stop_check_every": config.train.stop_check_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    chunk = config.train.grad_cache_chunk_size
    if chunk < 0 or (chunk and config.train.micro_batch_size % chunk):
        raise ConfigError(
            f"train.grad_cache_chunk_size={chunk} must be 0 (off) or divide "
            f"train.micro_batch_size={config.train.micro_batch_size}"
        )
    validate_token_budget(config)
    validate_checkpointing(config)
    if config.data.pack_length < 0:
        raise ConfigError(f"data.pack_length must be >= 0 (0: the kernel's default), got {config.data.pack_length}")
    if config.train.save_every_minutes < 0:
        raise ConfigError(f"train.save_every_minutes must be >= 0 (0: off), got {config.train.save_every_minutes}")
    if config.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {config.data.num_workers}")
    if config.loss.gather_group_size < 0:
        raise ConfigError(f"loss.gather_group_size must be >= 0, got {config.loss.gather_group_size}")
    if config.loss.hard_negatives < 0:
        raise ConfigError(f"loss.hard_negatives must be >= 0, got {config.loss.hard_negatives}")
    dims, weights = config.loss.matryoshka_dims, config.loss.matryoshka_weights
    if dims is not None and (not dims or any(d <= 0 for d in dims)):
        raise ConfigError(f"loss.matryoshka_dims must be positive dimensions, got {dims}")
    if weights is not None and (dims is None or len(weights) != len(dims)):
        raise ConfigError(f"loss.matryoshka_weights needs one weight per loss.matryoshka_dims entry, got {weights}")
    if config.model.kind == "reranker":
        validate_reranker(config)
    elif config.loss.inbatch_negatives:
        raise ConfigError(
            f"loss.inbatch_negatives applies to rerankers (model.kind=reranker), not model.kind={config.model.kind}: "
            "an embedding model's local and global pools already hold every passage of the batch"
        )
    validate_multi_vector(config)
    validate_sparse(config)
    if config.model.lora is not None:
        config.model.lora = resolve_lora(config.model.lora, config.model.kind)
    if config.loss.distill is not None:
        config.loss.distill = resolve_distill(config.loss.distill, config.model.kind)
    if config.loss.negatives == "group" and config.loss.hard_negatives == 0:
        raise ConfigError(
            "loss.negatives=group needs loss.hard_negatives >= 1 (the group would hold only the positive)"
        )


def validate_checkpointing(config):
    """train.activation_checkpointing: true, false, auto, or k >= 1 (every k-th decoder layer)."""
    value = config.train.activation_checkpointing
    if isinstance(value, str) and value != AUTO:
        raise ConfigError(f"train.activation_checkpointing: {value!r} is not true, false, auto or an integer k >= 1")
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ConfigError(
            f"train.activation_checkpointing={value}: k checkpoints every k-th decoder layer and must be >= 1 "
            "(false: none)"
        )


def checkpoint_every(config, ds_config):
    """Every how many decoder layers activation checkpointing is on (0 = off, 1 = every layer):
    train.activation_checkpointing, or with `auto` what deepspeed_config decided (its embedtrain_auto)."""
    value = config.train.activation_checkpointing
    if value == AUTO:
        return ds_config[AUTO_KEY]["checkpoint_every"]
    if isinstance(value, bool):
        return int(value)
    return value


def validate_token_budget(config):
    """train.micro_batch_tokens: 0 (off) or a budget of tokens, at least one sequence's maximum (a
    budget smaller than that reads like a query count, train.micro_batch_size's unit); it replaces
    train.grad_cache_chunk_size, which it sizes by tokens under the local/global pools."""
    tokens, chunk = config.train.micro_batch_tokens, config.train.grad_cache_chunk_size
    if tokens < 0:
        raise ConfigError(f"train.micro_batch_tokens must be >= 0 (0: off), got {tokens}")
    if not tokens:
        return
    if config.model.kind == "reranker":
        longest, keys = config.data.pair_max_length, "data.pair_max_length"
    else:
        longest = max(config.data.query_max_length, config.data.passage_max_length)
        keys = "data.query_max_length/passage_max_length"
    if tokens < longest:
        raise ConfigError(
            f"train.micro_batch_tokens={tokens} counts tokens, not queries: it must be at least the longest "
            f"sequence ({keys}: {longest}); train.micro_batch_size counts queries"
        )
    if chunk:
        raise ConfigError(
            f"train.micro_batch_tokens={tokens} and train.grad_cache_chunk_size={chunk}: set one. With the "
            "local/global pools the token budget sizes the GradCache chunks itself; with the group pool "
            "it cuts micro-steps, which need no GradCache"
        )


def with_defaults(value, defaults, key, hint=""):
    """A settings mapping `value` of config key `key` (model.lora ...) over its `defaults`, refusing
    an unknown key with a did-you-mean, the keys it takes and `hint(unknown key)` when given."""
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown key{did_you_mean(unknown[0], defaults)}; {key} takes {', '.join(defaults)}"
            + (hint(unknown[0]) if hint else "")
        )
    return {**defaults, **value}


def resolve_lora(lora, kind="embedding"):
    """model.lora with every key checked and the omitted ones filled from LORA_DEFAULTS (the resolved
    values are what the run folder records). Needs peft, an optional extra."""
    resolved = with_defaults(lora, LORA_DEFAULTS, "model.lora")
    resolved["r"] = _coerce(resolved["r"], int, "model.lora.r")
    resolved["alpha"] = _coerce(resolved["alpha"], float, "model.lora.alpha")
    resolved["dropout"] = _coerce(resolved["dropout"], float, "model.lora.dropout")
    targets = resolved["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets  # `target_modules: q_proj` is one module
    resolved["target_modules"] = _coerce(targets, list[str], "model.lora.target_modules")
    if resolved["r"] <= 0:
        raise ConfigError(f"model.lora.r must be a positive rank, got {resolved['r']}")
    if resolved["alpha"] <= 0:
        raise ConfigError(
            f"model.lora.alpha must be positive (the update is scaled by alpha / r), got {resolved['alpha']}"
        )
    if not 0.0 <= resolved["dropout"] < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {resolved['dropout']}")
    for name in resolved["target_modules"]:
        if name not in LLAMA_PROJECTIONS:
            raise ConfigError(
                f"model.lora.target_modules: {name!r} is not a linear projection of a Llama block"
                f"{did_you_mean(name, LLAMA_PROJECTIONS)}; choose from {', '.join(LLAMA_PROJECTIONS)}"
            )
    if not resolved["target_modules"] or len(set(resolved["target_modules"])) != len(resolved["target_modules"]):
        raise ConfigError(f"model.lora.target_modules must name distinct modules, got {resolved['target_modules']}")
    # multi_vector: its token projection, a new head, is trained in full beside the adapter (model/lora.py)
    if kind not in ("embedding", "multi_vector"):
        raise ConfigError(
            f"model.lora applies to embedding and multi-vector models; model.kind={kind} would also need its "
            "scoring head trained"
        )
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError("model.lora needs the peft package, an optional extra: pip install embedtrain[lora]")
    return resolved


# model.kind=multi_vector (ColBERT late interaction: Khattab and Zaharia 2020, arXiv 2004.12832). The
# query and document lengths are data.query_max_length and data.passage_max_length.
MULTI_VECTOR_DEFAULTS = {
    "dim": 128,  # width of each token vector: the projection's (ColBERT's and PyLate's default)
    # null, or {attend: true|false}: queries cut and filled to exactly data.query_max_length tokens with the
    # tokenizer's mask token (else eos), which the other tokens attend to only with attend: true (ColBERT: false)
    "query_expansion": None,
    "skiplist": "punctuation",  # document tokens not scored: punctuation (ColBERT's: string.punctuation) | none
}
MULTI_VECTOR_SKIPLISTS = ("punctuation", "none")


def resolve_multi_vector(value):
    """model.multi_vector with every key checked and the omitted ones filled from
    MULTI_VECTOR_DEFAULTS (the resolved values are what the run folder records). The lengths are not
    here: data.query_max_length and data.passage_max_length own them (with query_expansion the
    query length is the expansion length)."""
    if not isinstance(value, dict):
        raise ConfigError(f"model.multi_vector: expected a mapping of settings, got {value!r}")
    length = " (the query and document lengths are data.query_max_length and data.passage_max_length)"
    resolved = with_defaults(
        value, MULTI_VECTOR_DEFAULTS, "model.multi_vector", lambda unknown: length if "length" in unknown else ""
    )
    resolved["dim"] = _coerce(resolved["dim"], int, "model.multi_vector.dim")
    if resolved["dim"] <= 0:
        raise ConfigError(f"model.multi_vector.dim must be a positive width, got {resolved['dim']}")
    if resolved["skiplist"] not in MULTI_VECTOR_SKIPLISTS:
        raise ConfigError(
            f"model.multi_vector.skiplist: {resolved['skiplist']!r} is not one of {', '.join(MULTI_VECTOR_SKIPLISTS)}"
        )
    expansion = resolved["query_expansion"]
    if expansion is not None:
        if not isinstance(expansion, dict):
            raise ConfigError(
                f"model.multi_vector.query_expansion: expected null or {{attend: true|false}}, got {expansion!r}"
            )
        extra = sorted(set(expansion) - {"attend"})
        if extra:
            hint = " (the expansion length is data.query_max_length)" if extra[0] == "length" else ""
            raise ConfigError(
                f"model.multi_vector.query_expansion.{extra[0]}: unknown key; query_expansion takes attend{hint}"
            )
        attend = _coerce(expansion.get("attend", False), bool, "model.multi_vector.query_expansion.attend")
        resolved["query_expansion"] = {"attend": attend}
    return resolved


def validate_multi_vector(config):
    """model.multi_vector resolved for model.kind=multi_vector and refused for any other kind, and
    the settings the MaxSim loss and collator do not implement refused, each naming its key."""
    kind = config.model.kind
    if kind != "multi_vector":
        if config.model.multi_vector is not None:
            raise ConfigError(f"model.multi_vector applies to model.kind=multi_vector, not model.kind={kind}")
        return
    config.model.multi_vector = resolve_multi_vector(config.model.multi_vector or {})
    for key, value in (
        ("loss.query_negatives", config.loss.query_negatives),
        ("loss.matryoshka_dims", config.loss.matryoshka_dims),
        ("loss.distill", config.loss.distill),
    ):
        if value:
            raise ConfigError(f"{key} is not supported for multi-vector models (model.kind=multi_vector); unset it")
    expansion = config.model.multi_vector["query_expansion"]
    if expansion is not None and not expansion["attend"] and config.data.packing:
        raise ConfigError(
            "model.multi_vector.query_expansion.attend=false with data.packing=true: a packed row cannot hold "
            "expansion tokens that are scored but not attended to; set data.packing=false, or attend: true"
        )


# model.kind=sparse (SPLADE). The FLOPS weights are the SPLADE authors' for SPLADE-max (SPLADE v2,
# arXiv 2109.10086), as their sentence-transformers training sets them: lambda_q 6e-4, lambda_d 8e-4
# (github.com/naver/splade, training_with_sentence_transformers/losses.py, MultipleNegativesRankingLossSplade,
# over a 30k-term BERT vocabulary). The weights warm up quadratically (SPLADE, arXiv 2107.05720)
# over flops_warmup_steps; None: a third of train.max_steps, as SPLADE reaches its weights at step
# 50k of 150k (naver/splade conf/train/config/splade.yaml: nb_iterations 150000).
# inference_free_queries: queries as a learned weight per vocabulary term, no encoder (sentence-
# transformers' SparseStaticEmbedding; Geng et al., arXiv 2411.04403). Their FLOPS weight then
# defaults to 0: a query's terms are its tokens whatever the table holds, so FLOPS cannot sparsify
# it (it would only shrink the weights), and inference-free SPLADE regularises the documents only.
SPARSE_DEFAULTS = {
    # weight of FLOPS(queries) in the loss, after the warm-up (SPLADE's lambda_q); 0 with inference-free queries
    "flops_query_weight": 6e-4,
    "flops_document_weight": 8e-4,  # weight of FLOPS(documents) (SPLADE's lambda_d)
    # optimizer steps over which both weights grow as (step / T)^2; None: train.max_steps // 3; 0: none
    "flops_warmup_steps": None,
    # queries as a learned weight per vocabulary term (initialised to 1), no encoder: the export's
    # query route is sentence-transformers' SparseStaticEmbedding
    "inference_free_queries": False,
    # inference_free_queries: the table's peak learning rate, on train.lr's schedule (None: 1e-3, the
    # rate sentence-transformers' SparseEncoderTrainingArguments gives SparseStaticEmbedding as its
    # learning_rate_mapping example; at a backbone's train.lr the table of ones barely moves)
    "query_table_lr": None,
}


def resolve_sparse(value, max_steps=None):
    """model.sparse with every key checked and the omitted ones filled from SPARSE_DEFAULTS (the
    resolved values are what the run folder records); flops_warmup_steps None becomes a third of
    `max_steps` (train.max_steps) when given."""
    if not isinstance(value, dict):
        raise ConfigError(f"model.sparse: expected a mapping of settings, got {value!r}")
    resolved = with_defaults(value, SPARSE_DEFAULTS, "model.sparse")
    resolved["inference_free_queries"] = _coerce(
        resolved["inference_free_queries"], bool, "model.sparse.inference_free_queries"
    )
    if resolved["inference_free_queries"] and "flops_query_weight" not in value:
        resolved["flops_query_weight"] = 0.0  # see SPARSE_DEFAULTS: the documents only
    for key in ("flops_query_weight", "flops_document_weight"):
        resolved[key] = _coerce(resolved[key], float, f"model.sparse.{key}")
        if resolved[key] < 0:
            raise ConfigError(f"model.sparse.{key} must be >= 0 (0: no FLOPS regularisation), got {resolved[key]}")
    warmup = resolved["flops_warmup_steps"]
    if warmup is None and max_steps is not None:
        warmup = max_steps // 3
    if warmup is not None:
        warmup = _coerce(warmup, int, "model.sparse.flops_warmup_steps")
        if warmup < 0:
            raise ConfigError(f"model.sparse.flops_warmup_steps must be >= 0 (0: no warm-up), got {warmup}")
    resolved["flops_warmup_steps"] = warmup
    table_lr = resolved["query_table_lr"]
    if table_lr is not None and not resolved["inference_free_queries"]:
        raise ConfigError(
            "model.sparse.query_table_lr applies to inference-free queries (model.sparse.inference_free_queries: "
            "true); without them queries are encoded by the backbone at train.lr"
        )
    if resolved["inference_free_queries"]:
        table_lr = _coerce(1e-3 if table_lr is None else table_lr, float, "model.sparse.query_table_lr")
        if table_lr <= 0:
            raise ConfigError(f"model.sparse.query_table_lr must be > 0, got {table_lr}")
    resolved["query_table_lr"] = table_lr
    return resolved


def validate_sparse(config):
    """model.sparse resolved for model.kind=sparse and refused for any other kind, and the settings a
    sparse model does not support refused, each naming its key. model.pooling and model.normalize do
    not apply (the term weights are max-pooled and never normalised) and are ignored."""
    kind = config.model.kind
    if kind != "sparse":
        if config.model.sparse is not None:
            raise ConfigError(f"model.sparse applies to model.kind=sparse, not model.kind={kind}")
        return
    config.model.sparse = resolve_sparse(config.model.sparse or {}, config.train.max_steps)
    for key, value in (
        ("loss.matryoshka_dims", config.loss.matryoshka_dims),
        ("loss.distill", config.loss.distill),
        ("model.lora", config.model.lora),
    ):
        if value is not None:
            raise ConfigError(f"{key} is not supported for sparse models (model.kind=sparse); unset it")
    if config.model.sparse["inference_free_queries"] and config.loss.query_negatives:
        raise ConfigError(
            "loss.query_negatives=true with model.sparse.inference_free_queries=true: the other queries would be "
            "candidates weighed by the query table, which no document is; set loss.query_negatives=false"
        )


def resolve_distill(distill, kind="embedding"):
    """loss.distill with every key checked and the omitted ones filled from DISTILL_DEFAULTS (the
    resolved values are what the run folder records)."""
    resolved = with_defaults(distill, DISTILL_DEFAULTS, "loss.distill")
    if not resolved["teacher_cache"]:
        raise ConfigError(
            "loss.distill.teacher_cache: required, the folder written by "
            "`embedtrain encode TEACHER --teacher-cache DATA --output CACHE`"
        )
    resolved["teacher_cache"] = resolve_path(str(resolved["teacher_cache"]))
    for key in ("contrastive", "cosine", "mse", "kl", "kl_temperature"):
        resolved[key] = _coerce(resolved[key], float, f"loss.distill.{key}")
        if resolved[key] < 0:
            raise ConfigError(f"loss.distill.{key} must be >= 0, got {resolved[key]}")
    if resolved["kl_temperature"] <= 0:
        raise ConfigError(f"loss.distill.kl_temperature must be positive, got {resolved['kl_temperature']}")
    if not any(resolved[key] for key in ("contrastive", "cosine", "mse", "kl")):
        raise ConfigError("loss.distill: every weight (contrastive, cosine, mse, kl) is 0: nothing to train")
    if kind != "embedding":
        raise ConfigError(f"loss.distill applies to embedding models, not model.kind={kind}")
    return resolved


def validate_reranker(config):
    """A cross-encoder scores each pair alone: its loss is the cross-entropy over each query's group."""
    if config.loss.negatives not in ("group", "local"):
        raise ConfigError(
            f"loss.negatives={config.loss.negatives}: a reranker (model.kind=reranker) scores each (query, "
            "passage) pair on its own, so its negatives are pairs it scores itself, from its own micro-batch: "
            "set loss.negatives=group or local"
        )
    validate_inbatch_negatives(config)
    for key, value in (
        ("loss.matryoshka_dims", config.loss.matryoshka_dims),
        ("loss.query_negatives", config.loss.query_negatives),
    ):
        if value:
            raise ConfigError(f"{key} applies to embedding models; model.kind=reranker has no embeddings to train")
    if config.data.pair_max_length <= 0:
        raise ConfigError(f"data.pair_max_length must be positive, got {config.data.pair_max_length}")
    template = config.data.pair_template
    if "{query}" not in template or "{passage}" not in template:
        raise ConfigError(f"data.pair_template must contain {{query}} and {{passage}}, got {template!r}")
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
        template.format(query="", passage="")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"data.pair_template {template!r}: {err} (only {{query}} and {{passage}} may be used)"
        ) from err
    if any(name not in ("query", "passage") or conv or spec for name, conv, spec in fields):
        raise ConfigError(
            f"data.pair_template {template!r}: use plain {{query}} and {{passage}} fields only (no other names, "
            "conversions or format specs)"
        )


# in-batch negatives per query when a reranker's loss.negatives=local leaves loss.inbatch_negatives 0:
# sentence-transformers' CrossEncoder MultipleNegativesRankingLoss default (num_negatives=4)
DEFAULT_INBATCH_NEGATIVES = 4


def validate_inbatch_negatives(config):
    """loss.inbatch_negatives: other queries' positives a reranker scores each query against under
    loss.negatives=local (0 there resolves to DEFAULT_INBATCH_NEGATIVES); off (0) under group. They
    come from the query's own micro-batch, so a micro-batch needs a second query."""
    loss, count = config.loss, config.loss.inbatch_negatives
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"loss.inbatch_negatives must be an integer >= 0, got {count!r}")
    if loss.negatives == "group":
        if count:
            raise ConfigError(
                f"loss.inbatch_negatives={count} needs loss.negatives=local (group scores each query against "
                "its own hard negatives only)"
            )
        return
    loss.inbatch_negatives = count or DEFAULT_INBATCH_NEGATIVES
    if not config.train.micro_batch_tokens and config.train.micro_batch_size < 2:
        raise ConfigError(
            "loss.negatives=local for a reranker takes its in-batch negatives from the other queries of the "
            f"micro-batch: train.micro_batch_size={config.train.micro_batch_size} must be >= 2"
        )


def batch_layout(config, world_size):
    """(micro_batch, accumulation_steps) with micro x accumulation x world == global, or an error."""
    micro, total = config.train.micro_batch_size, config.train.global_batch_size
    if total % (micro * world_size) != 0:
        raise ConfigError(
            f"train.global_batch_size={total} is not divisible by train.micro_batch_size={micro} x "
            f"world size {world_size}; micro x accumulation x world must equal the global batch"
        )
    return micro, total // (micro * world_size)


def deepspeed_micro_steps(config, world_size):
    """(train_micro_batch_size_per_gpu, gradient_accumulation_steps) as DeepSpeed must see them.
    Without GradCache these are the micro-batch and its accumulation. With GradCache every chunk
    is one DeepSpeed micro-step (one backward), so DeepSpeed's accumulation window spans
    accumulation x chunks backwards of `chunk` queries; the optimizer steps once per global batch.
    With train.micro_batch_tokens the number of backwards varies per step: the training loop marks
    the accumulation boundary itself (train/grad_cache.set_boundary) and divides each loss itself,
    so DeepSpeed's values only need micro x accumulation x world = global: one query x the rank's
    share."""
    micro, accumulation = batch_layout(config, world_size)
    if config.train.micro_batch_tokens:
        return 1, micro * accumulation
    chunk = config.train.grad_cache_chunk_size
    if not chunk:
        return micro, accumulation
    return chunk, accumulation * (micro // chunk)


def deepspeed_config_path(name):
    path = Path(name)
    for candidate in (path, DS_CONFIGS_DIR / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"deepspeed.config: {name} not found (looked in . and {DS_CONFIGS_DIR})")


def _merge(base, overrides):
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _resolve_auto(node, values, where="deepspeed"):
    for key, value in node.items():
        if isinstance(value, dict):
            _resolve_auto(value, values, f"{where}.{key}")
        elif value == "auto":
            if key not in values:
                raise ConfigError(f"{where}.{key}: 'auto' has no value that embedtrain can fill in")
            node[key] = values[key]


AUTO = "auto"
# the auto decision inside the DeepSpeed dict (DeepSpeed ignores the key; its checkpoints keep it)
AUTO_KEY = "embedtrain_auto"


def micro_step_tokens(config):
    """(tokens, what they are) whose activations one forward holds: train.micro_batch_tokens when set,
    else the micro-batch's (or GradCache chunk's) queries at their max lengths, as `embedtrain plan` counts."""
    budget = getattr(config.train, "micro_batch_tokens", 0)
    if budget:
        return budget, "train.micro_batch_tokens"
    queries = config.train.grad_cache_chunk_size or config.train.micro_batch_size
    group = 1 + config.loss.hard_negatives
    if config.model.kind == "reranker":
        group += getattr(config.loss, "inbatch_negatives", 0)  # in-batch negatives: pairs of their own
        return queries * group * config.data.pair_max_length, f"{queries} queries x {group} pairs at max length"
    per_query = config.data.query_max_length + group * config.data.passage_max_length
    return queries * per_query, f"{queries} queries x (1 + {group}) sequences at max length"


def model_shape(config):
    """The Shape of model.path's config.json (auto sizes memory from it)."""
    from embedtrain.shape import Shape

    path = Path(config.model.path) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"deepspeed.config=auto / train.activation_checkpointing=auto size the model from {path}, "
            "which does not exist; set model.path to a checkpoint folder or name a DeepSpeed JSON"
        )
    try:
        return Shape.from_config(json.loads(path.read_text()))
    except ValueError as err:
        raise ConfigError(f"model.path: {path}: {err}") from err


def auto_decision(config, world_size, stage=None, hardware=None, shape=None):
    """The auto decision (embedtrain.autoconfig) for this config on `hardware` (default: this
    machine's, for `world_size` ranks); `stage` fixes the ZeRO stage (an explicit JSON or override)."""
    from embedtrain import autoconfig

    hardware = hardware or autoconfig.detect_hardware(world_size)
    shape = shape or model_shape(config)
    tokens, _ = micro_step_tokens(config)
    value = config.train.activation_checkpointing
    every = None if value == AUTO else (int(value) if isinstance(value, bool) else value)
    return autoconfig.decide(shape, hardware, tokens, shape.lora_params(config.model.lora), stage, every)


def deepspeed_config(config, world_size, hardware=None, shape=None):
    """The DeepSpeed JSON with recipe overrides merged and "auto" values filled from the recipe.
    deepspeed.config=auto builds the JSON from the auto decision (embedtrain.autoconfig) for
    `hardware` (default: this machine) and `shape` (default: model.path's config.json); it and
    train.activation_checkpointing=auto record the decision under "embedtrain_auto"."""
    name = config.deepspeed.get("config", "zero3.json")
    overrides = {k: v for k, v in config.deepspeed.items() if k != "config"}
    decision = None
    if name == AUTO:
        from embedtrain.autoconfig import auto_deepspeed_json

        path = "deepspeed.config=auto"
        forced = (overrides.get("zero_optimization") or {}).get("stage")
        shape = shape or model_shape(config)
        decision = auto_decision(config, world_size, forced, hardware, shape)
        ds = auto_deepspeed_json(decision, shape)
    else:
        path = deepspeed_config_path(name)
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from err
    _merge(ds, overrides)
    micro, accumulation = deepspeed_micro_steps(config, world_size)
    _resolve_auto(
        ds,
        {
            "train_batch_size": config.train.global_batch_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
        },
    )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0-3, got {stage}")
    set_grad_accum_dtype(ds, stage, path)
    if decision is None and config.train.activation_checkpointing == AUTO:
        # the recompute only: the JSON's stage stands, and hpZ comes with auto's JSON alone (every ZeRO-3
        # run, auto or not, gets its decoder layers as leaf modules: train/engine.py)
        decision = dataclasses.replace(
            auto_decision(config, world_size, stage, hardware, shape), leaf_modules=False, hpz=1
        )
    if decision is not None:
        ds[AUTO_KEY] = {**decision.record(), "deepspeed_config": name}
    if stage < 3 and ds.get("bf16", {}).get("enabled") and ds["bf16"].get("check_grad_overflow") is False:
        # ZeRO-1/2 in bf16 skip a step with a non-finite gradient only with this check on; without
        # it a NaN would reach the weights and train.max_skipped_steps could not act
        raise ConfigError(
            f"{path}: bf16.check_grad_overflow=false under ZeRO stage {stage}: non-finite steps would "
            "be applied instead of skipped; remove the key or set it true"
        )
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ConfigError(
            f"{path}: optimizer and scheduler belong to the recipe (optim.*, train.lr), not the DeepSpeed JSON"
        )
    validate_with_deepspeed(ds, path)
    return ds


def set_grad_accum_dtype(ds, stage, path):
    """Under bf16 and ZeRO, gradients accumulate over micro-steps in fp32 (data_types.grad_accum_dtype,
    unless the JSON or a recipe override sets it): DeepSpeed 0.19.8 accumulates in the parameters'
    dtype otherwise (runtime/engine.py:1806, get_data_types), and a bf16 sum over 8 micro-steps has
    about twice the error of one rounding (tests/test_grad_accum.py). Every ZeRO stage honours it
    (docs/distributed.md, "Precision"): ZeRO-1 through BF16_Optimizer's fp32 gradient buffers
    (engine.py:2305), ZeRO-1 with offload through fp32 param.grad_accum and ZeRO-2 through an fp32
    gradient partition (runtime/zero/stage_1_and_2.py:397, 1259), ZeRO-3 through its fp32 grad_partitions_flat_buffer
    (runtime/zero/stage3.py:791). Without ZeRO (stage 0) DeepSpeed refuses bf16 parameters with
    fp32 accumulation (engine.py:2313-2323), so stage 0 keeps bf16 and an explicit fp32 is refused here."""
    if not (ds.get("bf16") or {}).get("enabled"):
        return
    data_types = ds.get("data_types") or {}
    if stage == 0:
        if data_types.get("grad_accum_dtype") not in (None, "bf16", "bfloat16", "torch.bfloat16"):
            raise ConfigError(
                f"{path}: data_types.grad_accum_dtype={data_types['grad_accum_dtype']} with bf16 and "
                "zero_optimization.stage=0: DeepSpeed accumulates only in bf16 without ZeRO; use ZeRO "
                "stage 1-3 (fp32 accumulation by default) or remove the key"
            )
        return
    ds["data_types"] = {**data_types, "grad_accum_dtype": data_types.get("grad_accum_dtype", "fp32")}


def validate_with_deepspeed(ds, path):
    """DeepSpeed's own schema check (it forbids unknown ZeRO keys), before any process group or GPU.
    train_batch_size is left out: DeepSpeed would check it against the world size of this process,
    and batch_layout checks it against the real one."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig({k: v for k, v in ds.items() if k not in ("train_batch_size", AUTO_KEY)})
    except Exception as err:  # noqa: BLE001 - pydantic and assertion errors alike
        raise ConfigError(f"deepspeed.config {path} (with overrides) is rejected by DeepSpeed: {err}") from err


def precision_dtype(ds_config):
    """The parameter dtype the DeepSpeed config asks for (the only owner of precision)."""
    import torch

    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
