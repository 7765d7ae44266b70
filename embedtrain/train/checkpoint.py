"""Checkpoints: <run>/checkpoints/step_<N>/ holds the DeepSpeed state (model, optimizer,
scheduler, per-rank RNG and data position as client state), the resolved config, the base model's
config and tokenizer, and complete.json (every file and its size). Saves are atomic: the folder is
written as step_<N>.partial, renamed when complete, and only then does `latest` point at it.
Resume picks the newest complete checkpoint; export insists on the one `latest` names.

A LoRA run (model.lora) saves the DeepSpeed state of the adapter only: the frozen base is left out
(exclude_frozen_parameters; otherwise ZeRO-3 writes every rank's base partition and ZeRO-2 the
whole base, twice) and comes back from model.path. The adapter itself is also written in peft's
format (adapter_model.safetensors + adapter_config.json), gathered from the ranks' fp32 partitions."""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from embedtrain import distributed
from embedtrain.errors import CheckpointError
from embedtrain.file_modes import apply_umask
from embedtrain.model.lora import ADAPTER_BASE, base_fingerprint, lora_parameters, recorded_base, write_adapter
from embedtrain.model.reranker import KIND_FILE


def write_base_model(run_dir, backbone_config, tokenizer, prompt_policy, reranker=None):
    """<run>/base_model: the backbone config, tokenizer and prompt policy (embedtrain.prompts),
    copied into every checkpoint so that an export needs nothing but the checkpoint folder. For a
    reranker, `reranker` (its pair template and max length) goes to reranker.json."""
    folder = Path(run_dir) / "base_model"
    folder.mkdir(parents=True, exist_ok=True)
    if reranker is not None:
        (folder / KIND_FILE).write_text(json.dumps({"kind": "reranker", **reranker}, indent=2) + "\n")
    (folder / "prompts.json").write_text(json.dumps(prompt_policy.to_dict(), indent=2) + "\n")
    config = backbone_config.to_dict()
    for key in ("auto_map", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder)
    # Record the pad token side for consumers (not every transformers release writes it), and name a
    # tokenizer class that transformers 4.x also knows.
    tokenizer_config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    tokenizer_config.update(
        padding_side=tokenizer.padding_side, pad_token=tokenizer.pad_token, tokenizer_class="PreTrainedTokenizerFast"
    )
    tokenizer_config_file.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    return folder


def write_deepspeed_config(run_dir, ds_config):
    """<run>/deepspeed.json: the DeepSpeed config the run resolved (recipe overrides merged, batch
    sizes filled in); with deepspeed.config=auto or train.activation_checkpointing=auto its
    "embedtrain_auto" key holds the decision and its reason."""
    path = Path(run_dir) / "deepspeed.json"
    path.write_text(json.dumps(ds_config, indent=2) + "\n")
    return path


def check_stage_resume(engine, folder, saved):
    """Resume only under the ZeRO stage the checkpoint was written with: each stage lays out its
    optimizer state differently (ZeRO-1/2 flat partitions of the whole model, ZeRO-3 per-parameter
    partitions), and DeepSpeed loads one into another with an unrelated error or not at all. With
    deepspeed.config=auto the stage can change between runs when the cluster or card does; the
    error gives both decisions. `saved`: the checkpoint's rank-0 model states (DeepSpeed keeps the
    run's config in them)."""
    was_config = saved.get("ds_config") or {}
    was = (was_config.get("zero_optimization") or {}).get("stage", 0)
    now = engine.zero_optimization_stage()
    if int(was) == int(now):
        return
    why_was = (was_config.get("embedtrain_auto") or {}).get("reason")
    why_now = (engine.config.get("embedtrain_auto") or {}).get("reason") if isinstance(engine.config, dict) else None
    raise CheckpointError(
        f"{folder} was written under ZeRO stage {was}"
        + (f" (auto: {why_was})" if why_was else "")
        + f" and this run uses ZeRO stage {now}"
        + (f" (auto: {why_now})" if why_now else "")
        + f": a checkpoint resumes under the stage that wrote it. Resume with --set "
        f"deepspeed.zero_optimization.stage={was} (deepspeed.config=auto then sizes the recompute for that stage), "
        "or export the checkpoint and start a new run from the export (the optimizer state is then lost)"
    )


def checkpoint_root(run_dir):
    return Path(run_dir) / "checkpoints"


def rng_state():
    """This rank's RNG states (Python, NumPy, torch CPU and its CUDA device: dropout on the GPU draws
    from the latter) as plain lists and tensors, so that checkpoints load with weights_only=True."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one per rank
    return state


def restore_rng(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resume_checkpoint(resume, run_dir):
    """The checkpoint folder to resume from, or None. `resume` is auto, never, or a path."""
    if resume == "never":
        if find_resume_checkpoint(run_dir, log=lambda _: None) is not None:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints and train.resume=never: choose another "
                "--output-dir, or --resume auto to continue"
            )
        return None
    if resume == "auto":
        return find_resume_checkpoint(run_dir)
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        found = find_resume_checkpoint(path)
        if found is None:
            raise CheckpointError(f"train.resume: {path} holds no complete checkpoint")
        return found
    problem = checkpoint_problem(path) if path.is_dir() else f"{path} is not a folder"
    if problem is not None:
        raise CheckpointError(f"train.resume: {problem}")
    return path


def safe_globals():
    """The non-tensor classes DeepSpeed pickles into its checkpoint files; nothing else may load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 optimizer files

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path):
    """torch.load with weights_only=True (plus DeepSpeed's two classes), memory-mapped."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"cannot read checkpoint file {path}: {err}") from err


def save_checkpoint(engine, run_dir, step, stream_state, config_dict, keep=0):
    """Every rank calls this (ZeRO shards are per rank). Atomic: DeepSpeed writes step_N.partial/,
    rank 0 then writes complete.json (every file and its size), renames the folder to step_N and
    only then points `latest` at it. A crash at any moment leaves the previous checkpoint intact."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    lora = config_dict["model"].get("lora")
    try:
        engine.save_checkpoint(
            str(root),
            tag=tag + PARTIAL,
            save_latest=False,
            client_state={"step": step, "stream": stream_state, "rng": rng_state()},
            exclude_frozen_parameters=lora is not None,  # the frozen base comes from model.path
        )
    except OSError as err:  # disk full, quota, permissions: say so, leave the last good checkpoint alone
        shutil.rmtree(root / (tag + PARTIAL), ignore_errors=True)
        latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else "none"
        raise CheckpointError(
            f"saving checkpoint {tag} under {root} failed: {err}; the newest complete checkpoint ({latest}) is intact"
        ) from err
    adapter = gather_adapter(engine) if lora is not None else None  # a collective: every rank
    distributed.barrier()
    if engine.global_rank == 0:
        publish_checkpoint(root, tag, run_dir, stream_state, config_dict, adapter)
        prune_checkpoints(root, keep)
    distributed.barrier()
    return root / tag


PARTIAL = ".partial"


def gather_adapter(engine):
    """{name: full fp32 tensor on the host} of every LoRA weight; every rank calls it, in the same
    order. Read from the optimizer's fp32 master copy (under ZeRO the parameter is a partition, or
    in bf16 a rounded copy; the DeepSpeed state export and resume use the same masters). Reading
    `param.data` under ZeRO-3 would give empty placeholders: the empty adapter of DeepSpeed issue
    7900. Without a master copy (no ZeRO, fp32) the gathered parameter is the weight."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    tensors = {}
    for name, param in lora_parameters(engine.module):
        full = safe_get_full_fp32_param(param)
        if full is None:
            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach().clone()
        tensors[name] = full.detach().to("cpu", torch.float32).view(getattr(param, "ds_shape", param.shape))
    return tensors


def publish_checkpoint(root, tag, run_dir, stream_state, config_dict, adapter=None):
    """Rank 0, after every rank wrote: add our files, record the inventory, rename, move `latest`."""
    folder = root / (tag + PARTIAL)
    if adapter is not None:
        base = config_dict["model"]["path"]
        write_adapter(folder, adapter, config_dict["model"]["lora"], base, base_fingerprint(base))
    (folder / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    (folder / "stream.json").write_text(json.dumps(stream_state, indent=2))
    shutil.copytree(Path(run_dir) / "base_model", folder / "base_model", dirs_exist_ok=True)
    inventory = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "complete.json").write_text(json.dumps(inventory, indent=2))
    apply_umask(folder)  # every rank's files: the user's umask, not 0600 (the LoRA adapter's safetensors)
    final = root / tag
    if final.exists():  # a re-save of the same step (resumed run): replace it
        shutil.rmtree(final)
    folder.rename(final)
    write_latest(root, tag)


def write_latest(root, tag):
    tmp = root / "latest.tmp"
    tmp.write_text(tag + "\n")
    tmp.replace(root / "latest")


def prune_checkpoints(root, keep):
    """Keep the newest `keep` complete checkpoints (0: all); partial folders of crashed saves go too."""
    for partial in root.glob(f"step_*{PARTIAL}"):
        shutil.rmtree(partial, ignore_errors=True)
    if keep > 0:
        steps = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def check_lora_resume(engine, folder, saved, config):
    """Resume a LoRA run only from a checkpoint of the same adapter (model.lora) on the same base
    (its fingerprint), whose trained parameters are exactly this model's; a full fine-tune only from
    a full one. `saved`: the checkpoint's rank-0 model states."""
    saved_config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    was = (saved_config.get("model") or {}).get("lora")
    if was != config.model.lora:
        raise CheckpointError(
            f"{folder}: model.lora was {was}, now {config.model.lora}: the trained parameters would change; "
            "keep model.lora to resume (export the checkpoint and start a new run from it to change it)"
        )
    if config.model.lora is None:
        return
    recorded = recorded_base(folder)
    if recorded.get("fingerprint") != base_fingerprint(config.model.path):
        raise CheckpointError(
            f"{folder} holds an adapter trained on another base model than model.path={config.model.path} "
            f"(the fingerprint of its weights differs from the one in {ADAPTER_BASE}, recorded from "
            f"{recorded.get('base_model')}); resume with the base the run was started from"
        )
    if saved.get("param_shapes") is not None:  # ZeRO: the optimizer's parameters, by name
        trained = {name: tuple(shape) for group in saved["param_shapes"] for name, shape in group.items()}
    else:
        buffers = set(saved.get("buffer_names") or ())
        trained = {name: tuple(t.shape) for name, t in saved["module"].items() if name not in buffers}
    expected = {
        name: tuple(getattr(param, "ds_shape", param.shape))
        for name, param in engine.module.named_parameters()
        if param.requires_grad
    }
    if trained != expected:
        different = sorted(set(trained.items()) ^ set(expected.items()))
        raise CheckpointError(
            f"{folder} does not match this model ({config.model.path}): its adapter parameters differ, e.g. "
            f"{different[0][0]}"
        )


def checkpoint_problem(folder):
    """None if `folder` is a complete checkpoint, else what is wrong with it."""
    inventory_file = folder / "complete.json"
    if not inventory_file.is_file():
        return f"{folder} has no complete.json (the save did not finish)"
    try:
        inventory = json.loads(inventory_file.read_text())
    except json.JSONDecodeError:
        return f"{inventory_file} is not valid JSON"
    for name, size in inventory.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


def find_resume_checkpoint(run_dir, log=print):
    """The newest complete checkpoint of a run: `latest` if it checks out, else (with a warning)
    the newest older one that does. None when the run has none."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL)),
        key=lambda p: int(p.name.split("_")[1]),
        reverse=True,
    )
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if latest:
        candidates.sort(key=lambda p: p.name != latest)  # try `latest` first
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"[embedtrain] warning: skipping checkpoint {folder.name}: {problem}")
    return None


def resolve_checkpoint(path):
    """For export: a run folder (the checkpoint `latest` names), its checkpoints folder, or a step
    folder -> (checkpoints root, tag). Strict: an incomplete or damaged checkpoint is an error."""
    path = Path(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (root / "latest").is_file():
        folder = root / (root / "latest").read_text().strip()
    elif path.is_dir() and path.name.startswith("step_"):
        folder = path
    else:
        raise CheckpointError(
            f"{path} is not a run folder, a checkpoints folder or a checkpoint step folder "
            "(no checkpoints/, no latest file, not step_<N>)"
        )
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} is incomplete or damaged: {problem}")
    return folder.parent, folder.name


def file_rank(path):
    """The data-parallel rank in a DeepSpeed file name: zero_pp_rank_<R>_mp_rank_00_..., with a
    bf16_ prefix in bf16 runs; ZeRO-1/2 write one mp_rank_00_model_states.pt (rank 0)."""
    found = re.search(r"zero_pp_rank_(\d+)_", Path(path).name)
    return int(found.group(1)) if found else 0


def rank_files(folder, kind):
    """Per-rank DeepSpeed files ("model" or "optim") of one checkpoint, in rank order."""
    files = sorted(Path(folder).glob(f"*_{kind}_states.pt"), key=file_rank)
    if not files:
        raise CheckpointError(f"{folder} holds no DeepSpeed {kind} states (*_{kind}_states.pt): incomplete checkpoint?")
    return files


def zero3_full_tensors(folder, keys=("fp32",)):
    """Yield (name, {key: full fp32 tensor}) for every trained parameter of a ZeRO-3 checkpoint, one
    parameter at a time; keys: "fp32" (master weights) and optimizer state names ("exp_avg", ...).

    Each rank's optimizer file holds, per parameter group, the concatenation of its slice of every
    parameter (ceil(numel / W) elements each, the last rank's slice padded). Files are memory-mapped.
    """
    import math

    model_states = load_checkpoint_file(rank_files(folder, "model")[0])
    world = model_states["dp_world_size"]
    optim_files = rank_files(folder, "optim")
    if len(optim_files) != world:
        raise CheckpointError(
            f"{folder}: {len(optim_files)} optimizer partition file(s) for a {world}-rank run: partial checkpoint"
        )
    optim = [load_checkpoint_file(f)["optimizer_state_dict"] for f in optim_files]

    def flat(rank, group, key):
        return (
            optim[rank]["fp32_flat_groups"][group]
            if key == "fp32"
            else optim[rank]["optimizer_state_dict"]["state"][group][key]
        )

    for group, shapes in enumerate(model_states["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            yield (
                name,
                {
                    key: torch.cat([flat(rank, group, key).narrow(0, offset, part) for rank in range(world)])[
                        :numel
                    ].view(shape)
                    for key in keys
                },
            )
            offset += part


def load_resharded(engine, folder):
    """Resume ZeRO-3 state written by W' ranks on W != W' ranks (e.g. a job requeued on fewer nodes):
    every parameter, its fp32 master copy and both Adam moments are assembled from the old
    partitions and scattered into the new ones; step counts, scheduler and counters follow.
    Returns the client state of the old rank with this rank's number (rank 0's if there is none)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    model_files = rank_files(folder, "model")
    saved = load_checkpoint_file(model_files[0])
    named = dict(engine.module.named_parameters())
    for flat in engine.optimizer.fp32_partitioned_groups_flat:  # Adam creates its moments lazily
        state = engine.optimizer.optimizer.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(flat))
    for name, full in zero3_full_tensors(folder, ("fp32", "exp_avg", "exp_avg_sq")):
        param = named[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if engine.global_rank == 0:
                param.data.copy_(full["fp32"].to(param.dtype))
        safe_set_full_fp32_param(param, full["fp32"])
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, full[key], key)
    step = load_checkpoint_file(rank_files(folder, "optim")[0])["optimizer_state_dict"]["optimizer_state_dict"][
        "state"
    ][0]["step"]
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        engine.optimizer.optimizer.state[flat]["step"] = step.clone()
    engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr  # the scheduler's state says which lr the next step uses
    engine.global_steps, engine.global_samples = saved["global_steps"], saved["global_samples"]
    own = model_files[engine.global_rank] if engine.global_rank < len(model_files) else model_files[0]
    return load_checkpoint_file(own)
