"""Checkpoints: <run>/checkpoints/step_<N>/ holds the DeepSpeed state (model, optimizer,
scheduler, per-rank RNG and data position as client state), the resolved config, the base model's
config and tokenizer, and complete.json (every file and its size). Saves are atomic: the folder is
written as step_<N>.partial, renamed when complete, and only then does `latest` point at it.
Resume picks the newest complete checkpoint; export insists on the one `latest` names.

A LoRA run (model.lora) saves the DeepSpeed state of the adapter only: the frozen base is left out
(exclude_frozen_parameters; otherwise ZeRO-3 writes every rank's base partition and ZeRO-2 the
whole base, twice) and comes back from model.path. The adapter itself is also written in peft's
format (adapter_model.safetensors + adapter_config.json), gathered from the ranks' fp32 partitions,
and a head trained in full beside it (a multi-vector projection) as trained_head.safetensors
(model/lora.py); the DeepSpeed state holds both, as the run's trained parameters."""

import json
import random
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import yaml

from embedtrain import distributed
from embedtrain.errors import CheckpointError
from embedtrain.file_modes import apply_umask
from embedtrain.model.lora import ADAPTER_BASE, base_fingerprint, recorded_base, trained_parameters, write_adapter


def write_base_model(run_dir, backbone_config, tokenizer, prompt_policy, extras=None):
    """<run>/base_model: the backbone config, tokenizer and prompt policy (embedtrain.prompts),
    copied into every checkpoint so that an export needs nothing but the checkpoint folder.
    `extras`: {file name: JSON object}, the model kind's own files (ModelKind.base_model_files: a
    reranker's reranker.json holds its pair template and max length)."""
    folder = Path(run_dir) / "base_model"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (extras or {}).items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
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
    error gives both decisions. `saved`: the model states this rank read (own_resume_files);
    DeepSpeed keeps the run's config in them."""
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


READS = {"files": [], "state_bytes": 0}


def reset_reads():
    """Empty READS: the checkpoint files this process opened through load_checkpoint_file and the
    bytes of optimizer state it copied out of them (a resharded resume); tests and
    tools/resume_reads.py read it to bound what each rank reads."""
    READS["files"].clear()
    READS["state_bytes"] = 0


def load_checkpoint_file(path):
    """torch.load with weights_only=True (plus DeepSpeed's two classes), memory-mapped: only the
    pickle is read here, a tensor's bytes when they are used. Counted in READS."""
    READS["files"].append(str(path))
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
    # every rank's own list of what it wrote, gathered after its writes: rank 0 builds complete.json
    # from these lists, so a rank whose files rank 0 cannot see fails the save instead of being left out
    written = distributed.gather_object((socket.gethostname(), written_files(engine, root / (tag + PARTIAL))))
    shards = None
    if written is not None:
        shards = {"stage": engine.zero_optimization_stage(), "world": engine.dp_world_size, "ranks": written}

    def publish():
        publish_checkpoint(root, tag, run_dir, stream_state, config_dict, adapter, shards)
        prune_checkpoints(root, keep)

    distributed.run_on_main(publish)  # rank 0's error (a missing shard) stops every rank
    return root / tag


def written_files(engine, folder):
    """{name: size} of the DeepSpeed files this rank wrote into `folder`, as this rank sees them:
    the names DeepSpeed 0.19's engine gives them (runtime/engine.py: _get_ckpt_name for the model
    states, written where save_non_zero_checkpoint is set; _get_zero_ckpt_name for the optimizer
    states, where save_zero_checkpoint is)."""
    root, tag = str(folder.parent), folder.name
    paths = []
    if engine.save_non_zero_checkpoint:
        paths.append(Path(engine._get_ckpt_name(root, tag)))
    if engine.save_zero_checkpoint:
        paths.append(Path(engine._get_zero_ckpt_name(root, tag)))
    try:
        return {str(path.relative_to(folder)): path.stat().st_size for path in paths}
    except OSError as err:
        raise CheckpointError(
            f"rank {engine.global_rank} on {socket.gethostname()} cannot see the checkpoint file it just wrote: {err}"
        ) from err


PARTIAL = ".partial"


def gather_adapter(engine):
    """{name: full fp32 tensor on the host} of every LoRA weight and of a head trained beside the
    adapter (model/lora.trained_parameters); every rank calls it, in the same order. Read from the
    optimizer's fp32 master copy (under ZeRO the parameter is a partition, or in bf16 a rounded
    copy; the DeepSpeed state export and resume use the same masters). Reading
    `param.data` under ZeRO-3 would give empty placeholders: the empty adapter of DeepSpeed issue
    7900. Without a master copy (no ZeRO, fp32) the gathered parameter is the weight."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    tensors = {}
    for name, param in trained_parameters(engine.module):
        full = safe_get_full_fp32_param(param)
        if full is None:
            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach().clone()
        tensors[name] = full.detach().to("cpu", torch.float32).view(getattr(param, "ds_shape", param.shape))
    return tensors


def publish_checkpoint(root, tag, run_dir, stream_state, config_dict, adapter=None, shards=None):
    """Rank 0, after every rank wrote: add our files, record the inventory, rename, move `latest`.

    `shards`: {"stage", "world", "ranks": [(host, {name: size}) per rank]}, every rank's own list of
    the DeepSpeed files it wrote (save_checkpoint). The inventory takes the DeepSpeed files from
    those lists (not from this rank's listing of the folder, which misses the files of a rank that
    wrote elsewhere or that a network file system does not show yet) and rank 0's own files from its
    listing; the lists must hold one set of shards per data-parallel rank (shard_problem), and
    rank 0 must see every listed file at the size its writer saw. Without `shards` (one process,
    tools) the listing is the inventory."""
    folder = root / (tag + PARTIAL)
    if adapter is not None:
        base = config_dict["model"]["path"]
        write_adapter(folder, adapter, config_dict["model"]["lora"], base, base_fingerprint(base))
    (folder / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
    (folder / "stream.json").write_text(json.dumps(stream_state, indent=2))
    shutil.copytree(Path(run_dir) / "base_model", folder / "base_model", dirs_exist_ok=True)
    listed = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    if shards is None:
        inventory = listed
    else:
        inventory = {name: size for name, size in listed.items() if not is_rank_file(name)}
        for _, files in shards["ranks"]:
            inventory.update(files)
        check_written_shards(folder, shards, listed)
        inventory = dict(sorted(inventory.items()))
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
    a full one. `saved`: the model states this rank read (own_resume_files)."""
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


def is_rank_file(name):
    """Whether a checkpoint file is one of DeepSpeed's per-rank model or optimizer states (listed
    by the rank that wrote it) rather than a file of rank 0's publish_checkpoint."""
    return "/" not in name and name.endswith("_states.pt")


def check_written_shards(folder, shards, listed):
    """Rank 0 at a save: every rank's list together holds one set of shards per data-parallel rank,
    and rank 0 sees each listed file at the size its writer saw; else a CheckpointError that names
    the ranks and hosts and leaves the previous checkpoint in place."""
    hosts = [host for host, _ in shards["ranks"]]
    problem = shard_problem([name for _, files in shards["ranks"] for name in files], shards["stage"], shards["world"])
    if problem is not None:
        raise CheckpointError(f"saving {folder.name}: {problem}; the newest complete checkpoint is intact")
    unseen = {}
    for index, (_, files) in enumerate(shards["ranks"]):
        for name, size in files.items():
            if listed.get(name) != size:
                unseen.setdefault(index, name)
    if unseen:
        raise CheckpointError(
            f"saving {folder.name}: rank 0 on {hosts[0]} does not see (or sees at another size) files that "
            f"{distributed.hosts_of(sorted(unseen), hosts)} wrote, e.g. {folder / next(iter(unseen.values()))}: "
            "train.output_dir is not one folder shared by every rank; give --output-dir a path on storage "
            "every node mounts at the same place. The newest complete checkpoint is intact"
        )


def shard_problem(names, stage, world):
    """None if the file names `names` of a checkpoint hold one set of DeepSpeed shards per
    data-parallel rank of a `world`-rank run under ZeRO `stage`, else what is missing. DeepSpeed 0.19
    (runtime/engine.py, _get_ckpt_name and _get_zero_ckpt_name) writes, per rank R:
    ZeRO-3 zero_pp_rank_R_mp_rank_00_model_states.pt and zero_pp_rank_R_mp_rank_00_optim_states.pt;
    ZeRO-1/2 the optimizer file per rank and one mp_rank_00_model_states.pt (rank 0); without ZeRO
    the model file and, with a bf16 optimizer, the optimizer file per rank. In bf16 runs the
    optimizer files start with bf16_."""
    names = [Path(name).name for name in names if "/" not in name]
    optim = {file_rank(name) for name in names if name.endswith("_optim_states.pt")}
    model = {file_rank(name) for name in names if re.search(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$", name)}
    single = "mp_rank_00_model_states.pt" in names
    every = set(range(world))
    missing = []
    if int(stage) == 3 and model != every:
        missing.append(f"the model states of rank(s) {', '.join(map(str, sorted(every - model))) or '?'}")
    if int(stage) != 3 and not single:
        missing.append("the model states (mp_rank_00_model_states.pt)")
    if optim != every and (int(stage) > 0 or optim):
        missing.append(f"the optimizer states of rank(s) {', '.join(map(str, sorted(every - optim))) or '?'}")
    if not missing:
        return None
    return (
        f"a {world}-rank ZeRO-{stage} checkpoint needs one set of shards per data-parallel rank; it lacks "
        + " and ".join(missing)
    )


def checkpoint_problem(folder):
    """None if `folder` is a complete checkpoint, else what is wrong with it: no complete.json, a
    listed file missing or of another size, or shards missing for some data-parallel rank (counted
    in the folder against the dp_world_size and ZeRO stage in the model states, so a complete.json
    written from a partial listing does not pass either)."""
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
    model_files = sorted(folder.glob("*_model_states.pt"))
    if not model_files:
        return f"{folder} holds no DeepSpeed model states (*_model_states.pt)"
    try:
        saved = load_checkpoint_file(model_files[0])
    except CheckpointError as err:
        return str(err)
    stage = ((saved.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    problem = shard_problem([p.name for p in folder.glob("*_states.pt")], stage, saved.get("dp_world_size", 1))
    return None if problem is None else f"{folder}: {problem}"


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


def own_resume_files(folder, rank):
    """Rank `rank`'s part of a checkpoint, loaded with weights_only=True before DeepSpeed's loader
    (which unpickles freely) reads the same files; returns its model states. A rank reads its own
    files only (DeepSpeed's loader, 0.19 runtime/engine.py, opens this rank's optimizer file and its
    model states: ZeRO-3 its own, else the one mp_rank_00 file), so resuming opens O(W) files in
    all, not O(W^2). The folder must hold one set of shards per data-parallel rank of the run that
    wrote it, as this rank sees it: a rank on a node that does not see the run folder's files names
    its host."""
    models = sorted(Path(folder).glob("*_model_states.pt"), key=file_rank)
    if not models:
        raise CheckpointError(f"{folder} holds no DeepSpeed model states (*_model_states.pt): incomplete checkpoint?")
    mine = [path for path in models if file_rank(path) == rank and "zero_pp_rank_" in path.name]
    saved = load_checkpoint_file(mine[0] if mine else models[0])
    stage = ((saved.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    problem = shard_problem([p.name for p in Path(folder).glob("*_states.pt")], stage, saved["dp_world_size"])
    if problem is not None:
        raise CheckpointError(f"{folder}, as rank {rank} on {socket.gethostname()} sees it: {problem}")
    if saved["dp_world_size"] > rank:  # this rank's optimizer file, which DeepSpeed's loader reads
        for path in Path(folder).glob("*_optim_states.pt"):
            if file_rank(path) == rank:
                load_checkpoint_file(path)
    return saved


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


def partition_pieces(numel, old_world, world, rank):
    """Where rank `rank` of a `world`-rank ZeRO-3 run finds its partition of a parameter of `numel`
    elements in the partitions of an `old_world`-rank checkpoint: [(old rank, start in that old
    partition, length, start in the new partition)]. A partition holds ceil(numel / W) elements,
    the last one zero-padded, so about old_world / world + 1 old partitions overlap a new one."""
    import math

    old_part, part = math.ceil(numel / old_world), math.ceil(numel / world)
    start, stop = min(rank * part, numel), min((rank + 1) * part, numel)
    pieces = []
    if start == stop:
        return pieces
    for old_rank in range(start // old_part, (stop - 1) // old_part + 1):
        low, high = max(start, old_rank * old_part), min(stop, (old_rank + 1) * old_part)
        pieces.append((old_rank, low - old_rank * old_part, high - low, low - start))
    return pieces


def zero3_local_tensors(folder, rank, world, keys=("fp32",)):
    """Yield (name, {key: this rank's partition, fp32}) for every trained parameter of a ZeRO-3
    checkpoint, as rank `rank` of a `world`-rank run partitions it (ceil(numel / world) elements,
    zero-padded). Only the old optimizer files that overlap this rank's partitions are opened
    (memory-mapped) and only the overlapping bytes are copied (`narrow`), so a rank reads about
    1/world of the optimizer state, not all of it (counted in READS["state_bytes"])."""
    import math

    model_states = load_checkpoint_file(rank_files(folder, "model")[0])
    old_world = model_states["dp_world_size"]
    optim_files = {file_rank(f): f for f in rank_files(folder, "optim")}
    if sorted(optim_files) != list(range(old_world)):
        raise CheckpointError(
            f"{folder}: optimizer partition files of rank(s) {sorted(optim_files)} for a {old_world}-rank run: "
            "partial checkpoint"
        )
    opened = {}

    def flat(old_rank, group, key):
        if old_rank not in opened:
            opened[old_rank] = load_checkpoint_file(optim_files[old_rank])["optimizer_state_dict"]
        state = opened[old_rank]
        return state["fp32_flat_groups"][group] if key == "fp32" else state["optimizer_state_dict"]["state"][group][key]

    for group, shapes in enumerate(model_states["param_shapes"]):
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            old_part = math.ceil(numel / old_world)
            local = {key: torch.zeros(math.ceil(numel / world), dtype=torch.float32) for key in keys}
            for old_rank, start, length, target in partition_pieces(numel, old_world, world, rank):
                for key in keys:
                    piece = flat(old_rank, group, key).narrow(0, offset + start, length)
                    local[key].narrow(0, target, length).copy_(piece)
                    READS["state_bytes"] += piece.numel() * piece.element_size()
            yield name, local
            offset += old_part


def optimizer_step_count(folder, rank, world):
    """Adam's step count in a ZeRO-3 checkpoint (the same in every rank's file), read from the old
    partition where this rank's partitions start, which zero3_local_tensors opened anyway."""
    files = rank_files(folder, "optim")
    state = load_checkpoint_file(files[min(rank * len(files) // world, len(files) - 1)])["optimizer_state_dict"]
    return state["optimizer_state_dict"]["state"][0]["step"]


def load_resharded(engine, folder):
    """Resume ZeRO-3 state written by W' ranks on W != W' ranks (e.g. a job requeued on fewer nodes):
    each rank reads from the old partitions only the part of every parameter's fp32 master copy and
    Adam moments that its new partition holds (zero3_local_tensors) and sets it in place; the
    parameters themselves are assembled over the ranks (an all-gather of the new partitions, not a
    read) and set from rank 0. Step counts, scheduler and counters follow. Returns the client state
    of the old rank with this rank's number (rank 0's if there is none)."""
    import math

    import deepspeed
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    model_files = rank_files(folder, "model")
    saved = load_checkpoint_file(model_files[0])
    named = dict(engine.module.named_parameters())
    for flat in engine.optimizer.fp32_partitioned_groups_flat:  # Adam creates its moments lazily
        state = engine.optimizer.optimizer.state[flat]
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(flat))
    rank, world = engine.global_rank, engine.dp_world_size
    for name, local in zero3_local_tensors(folder, rank, world, ("fp32", "exp_avg", "exp_avg_sq")):
        param = named[name]
        full = distributed.gather_no_grad(local["fp32"], uniform=True).cpu()[: math.prod(param.ds_shape)]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(full.view(param.ds_shape).to(param.dtype))
        safe_set_local_fp32_param(param, local["fp32"])
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_local_optimizer_state(param, local[key], key)
    step = optimizer_step_count(folder, rank, world)
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        engine.optimizer.optimizer.state[flat]["step"] = step.clone()
    engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr  # the scheduler's state says which lr the next step uses
    engine.global_steps, engine.global_samples = saved["global_steps"], saved["global_samples"]
    own = model_files[rank] if rank < len(model_files) else model_files[0]
    return load_checkpoint_file(own)
