"""What a resume may change: the settings that decide the data order and the learning-rate schedule
are compared with the checkpoint's, and a change is refused with each setting named (old -> new),
unless the user asks for it (train.resume_new_data_order, train.resume_new_schedule).

The checkpoint's side is its config.yaml: the resolved config of the run that wrote it (every
complete checkpoint holds one, written from the same config as the stream state), so checkpoints
written before these checks existed are compared too. A setting the saved config lacks (a checkpoint
of an older embedtrain) is unknown: it is not compared, and a warning says so.

The data order (docs/design.md, global batch order) is a pure function of the data and of:
  train.seed, train.global_batch_size       the sampler's keys and batch size
  data.mixing, data.mixing_temperature,     which subset each draw comes from (the temperature only
  data.subset_weights                       counts in the weighted modes without explicit weights,
                                            the weights only in the weighted modes)
  data.subsets                              the index space: which subsets, in which order
  data.positive_sampling                    which positive is each query's target
  data.length_bucketing                     which queries share a micro-batch (the in-batch pool)
  data.query_max_length,                    what each example holds: its texts' truncation
  data.passage_max_length                   (embedding models), data.pair_max_length (rerankers)
Not compared, because they change neither which examples a step holds nor their tokens:
data.packing, data.pack_length and data.pad_to_multiple_of (the layout of the same sequences),
train.micro_batch_tokens and train.micro_batch_size (how the same global batch is cut into
micro-steps and GradCache chunks), loss.hard_negatives (the number of negatives per query, a loss
setting), data.path (the data may move; its content is the user's) and the prompt prefixes.

The schedule: the LambdaLR multiplier is rebuilt from the current config on resume (engine.py), so
train.max_steps, optim.warmup_steps, optim.schedule and optim.min_lr_ratio would change the curve
from the resumed step on (max_steps and min_lr_ratio only count with a decaying schedule). train.lr
is different: the optimizer and scheduler states of the checkpoint hold it, so a new value would be
ignored; a change is refused with or without the opt-in.

The model: the checkpoint holds the weights and optimizer state of one model, so the settings that
decide which parameters exist are refused outright: model.kind, model.lora and each kind's
model_keys (the multi-vector projection's width, the sparse model's inference-free query table).
A run of another model starts from an export of this one (model.path).
"""

import copy
import json

import yaml

from embedtrain import distributed
from embedtrain.errors import CheckpointError
from embedtrain.kinds import kind_named

WEIGHTED = ("temperature", "single_subset")
EVERY_SUBSET = "every subset under data.path"
UNKNOWN = object()


def _get(tree, key):
    """tree["a"]["b"] for key "a.b"; UNKNOWN when a level is missing."""
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return UNKNOWN
        node = node[part]
    return node


def order_settings(tree):
    """{config key: value} of the settings that decide the data order, from a config as a dict
    (Config.to_dict() or a checkpoint's config.yaml); settings that do not count under the tree's
    own mixing mode or model kind are left out, settings the tree lacks are UNKNOWN."""
    keys = ["train.seed", "train.global_batch_size", "data.mixing", "data.subsets", "data.positive_sampling"]
    keys.append("data.length_bucketing")
    mixing = _get(tree, "data.mixing")
    if mixing in WEIGHTED or mixing is UNKNOWN:
        keys.append("data.subset_weights")
        if _get(tree, "data.subset_weights") in (None, UNKNOWN):
            keys.append("data.mixing_temperature")
    kind = _get(tree, "model.kind")
    keys += kind_named(None if kind is UNKNOWN else kind).length_keys
    return {key: _get(tree, key) for key in keys}


def model_settings(tree):
    """{config key: value} of the settings that decide the model's parameters (a config tree without
    model.kind is the default kind's, as kinds.kind_named reads it)."""
    kind = _get(tree, "model.kind")
    kind = kind_named(None if kind is UNKNOWN else kind)
    return {"model.kind": kind.name, **{key: _get(tree, key) for key in ("model.lora", *kind.model_keys)}}


def schedule_settings(tree):
    """{config key: value} of the settings the LR multiplier is rebuilt from on resume."""
    keys = ["optim.schedule", "optim.warmup_steps"]
    if _get(tree, "optim.schedule") != "constant":
        keys += ["train.max_steps", "optim.min_lr_ratio"]
    return {key: _get(tree, key) for key in keys}


def _show(value):
    if value is None:
        return "unset"
    if isinstance(value, bool):  # as a recipe or --set writes it
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _changes(saved, now, unknown):
    """'key: old -> new' for each key both sides hold with different values; keys the saved side
    lacks go to `unknown`."""
    changed = []
    for key, value in now.items():
        if key not in saved:
            continue  # does not count under the saved mode or kind (a change of that is named itself)
        if saved[key] is UNKNOWN:
            unknown.append(key)
        elif saved[key] != value:
            changed.append(f"{key}: {_show(saved[key])} -> {_show(value)}")
    return changed


def check_resume_settings(saved_config, saved_stream, config, folder):
    """Compare a checkpoint's settings with this run's; raise CheckpointError naming every refused
    change, else return the lines to print (warnings, and the changes the user asked for).

    `saved_config`: the checkpoint's config.yaml as a dict (None if it has none); `saved_stream`:
    its stream state (the data position: next_step, and the resolved subset names); `config`: this
    run's Config. Pure: reads nothing, prints nothing.

    train.max_steps below the checkpoint's step is an error: the run is already past it. Equal to
    it, there is nothing to train: the run resumes, trains no step and exits 0 with a line that says
    so, the same as running a finished run's command again (a requeued or retried job succeeds)."""
    step = int(saved_stream["next_step"])
    max_steps = config.train.max_steps
    if max_steps < step:
        raise CheckpointError(
            f"train.max_steps={max_steps} is below the step of the checkpoint {folder} ({step}): the run is "
            f"already past it. Set train.max_steps above {step} (with train.resume_new_schedule=true) to train "
            "on, or start a new run in another --output-dir"
        )
    if max_steps == step:
        return [f"[embedtrain] run already finished at step {step} ({folder}); nothing to do"]
    now = config.to_dict()
    saved = copy.deepcopy(saved_config or {})  # filled in below: the caller's stays as it is
    # the saved side's own fallbacks: the stream state records the sampler's settings itself
    for key, field in (("train.seed", "seed"), ("train.global_batch_size", "global_batch_size")):
        if _get(saved, key) is UNKNOWN and field in saved_stream:
            saved.setdefault(key.split(".")[0], {})[key.split(".")[1]] = saved_stream[field]
    for key, field in (("data.mixing", "mixing"), ("data.positive_sampling", "positive_sampling")):
        if _get(saved, key) is UNKNOWN and field in saved_stream:
            saved.setdefault("data", {})[key.split(".")[1]] = saved_stream[field]
    if _get(saved, "data.positive_sampling") is UNKNOWN:  # older than the setting: it was always "first"
        saved.setdefault("data", {})["positive_sampling"] = "first"
    saved_order, now_order = order_settings(saved), order_settings(now)
    if now_order["data.subsets"] is not None and "subsets" in saved_stream:
        saved_order["data.subsets"] = saved_stream["subsets"]  # the names the saved run resolved
    elif now_order["data.subsets"] is None and saved_order["data.subsets"] is not None:
        now_order["data.subsets"] = EVERY_SUBSET
    unknown, problems, notes = [], [], []
    order = _changes(saved_order, now_order, unknown)
    schedule = _changes(schedule_settings(saved), schedule_settings(now), unknown)
    lr = _changes({"train.lr": _get(saved, "train.lr")}, {"train.lr": config.train.lr}, unknown)
    model = _changes(model_settings(saved), model_settings(now), unknown)
    if model:
        problems.append(
            f"the model would change ({', '.join(model)}): the checkpoint holds another model's weights and "
            "optimizer state; keep these settings to resume, or start a new run from an export of it (model.path)"
        )
    if order and not config.train.resume_new_data_order:
        problems.append(
            f"the data order would change ({', '.join(order)}): keep these settings to resume, or set "
            "train.resume_new_data_order=true to continue on the new order"
        )
    elif order:
        notes.append(f"[embedtrain] resuming on a new data order (train.resume_new_data_order): {', '.join(order)}")
    if schedule and not config.train.resume_new_schedule:
        problems.append(
            f"the learning-rate schedule would change ({', '.join(schedule)}): keep these settings to resume, "
            "or set train.resume_new_schedule=true to continue on the new schedule from this step"
        )
    elif schedule:
        notes.append(f"[embedtrain] resuming on a new LR schedule (train.resume_new_schedule): {', '.join(schedule)}")
    if lr:
        problems.append(
            f"{lr[0]} would be ignored: a resumed run keeps the checkpoint's learning rate (its optimizer "
            "and scheduler states hold it); set it back, or start a new run from an export"
        )
    if problems:
        raise CheckpointError(f"resuming from {folder}: " + "; ".join(problems))
    if unknown:
        notes.insert(
            0,
            f"[embedtrain] warning: {folder} does not record {', '.join(unknown)} (an older checkpoint): "
            "not compared on resume",
        )
    return notes


def read_saved_config(folder):
    """The checkpoint's config.yaml as a dict, None without one (then every setting is unknown)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path} is not valid YAML: {err}") from err


def read_saved_stream(folder):
    """The checkpoint's stream state (stream.json, written with config.yaml when it was published)."""
    path = folder / "stream.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def check_resume(folder, config):
    """Every rank, at set-up before the dataset, model and engine load: check_resume_settings
    against the checkpoint's config.yaml and stream.json (small files: a refusal costs no start-up);
    rank 0 prints the lines it returns."""
    for line in check_resume_settings(read_saved_config(folder), read_saved_stream(folder), config, folder):
        if distributed.is_main_process():
            print(line, flush=True)
