"""The training loop: stream -> collate -> encoder -> loss -> DeepSpeed step, with logging and
checkpoints."""

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from embedtrain import distributed
from embedtrain.autoconfig import describe_checkpointing
from embedtrain.config import AUTO_KEY, batch_layout, checkpoint_every, deepspeed_config
from embedtrain.data.collate import encoder_parts
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import MANIFEST, PreparedDataset
from embedtrain.data.stream import Sampler, StepBatches, stream_state
from embedtrain.data.teacher import TeacherCache
from embedtrain.errors import CheckpointError, ConfigError, DataError, TrainingError
from embedtrain.kinds import kind_of
from embedtrain.model.attention import packs_in_one_row
from embedtrain.model.encoder import load_tokenizer, read_model_config
from embedtrain.shape import Shape
from embedtrain.train.checkpoint import (
    check_lora_resume,
    check_stage_resume,
    checkpoint_root,
    load_resharded,
    own_resume_files,
    restore_rng,
    resume_checkpoint,
    save_checkpoint,
    write_base_model,
    write_deepspeed_config,
)
from embedtrain.train.engine import build_engine
from embedtrain.train.resume_checks import check_resume
from embedtrain.train.step import micro_batch_queries


def open_dataset(data_config, run_dir, token=None):
    """The prepared dataset at data.path; a raw dataset folder is prepared first into
    data.prepared_path (default <run>/prepared), by one rank under a file lock (prepare_once).
    Large datasets: run `embedtrain prepare` once. `token`: this start of the run's token
    (distributed.check_shared_folder)."""
    path = Path(data_config.path)
    if not path.exists():
        raise DataError(f"data.path: {path} is not a folder (nor a dataset file `embedtrain prepare` reads)")
    if not (path / MANIFEST).is_file():
        target = Path(data_config.prepared_path or Path(run_dir) / "prepared")
        prepare_once(path, target, data_config.subsets, token)
        path = target
    return PreparedDataset(path, data_config.subsets)


def prepare_once(source, target, subsets, token=None):
    """Every rank, before any collective: prepare raw data under a file lock next to `target`, so
    that the other ranks wait on the lock and not in a collective (whose timeout would then have to
    grow with the data). The first rank to take the lock (.<name>.lock beside `target`) prepares
    and records the outcome (success or its DataError) in .<name>-prepared-<token> beside it; the
    others find that record and skip (or raise the same error). A node-local data.prepared_path is prepared once per
    node. Without a token (one process, test workers) the lock holder always prepares (prepare
    itself skips subsets already prepared from the same files)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = target.parent / f".{target.name}-prepared-{token}" if token else None
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if stamp is not None and stamp.is_file():
            outcome = json.loads(stamp.read_text())
            if outcome.get("error"):
                raise DataError(outcome["error"])
            return
        try:
            prepare(source, target, subsets)
        except DataError as err:
            if stamp is not None:
                stamp.write_text(json.dumps({"error": str(err)}))
            raise
        if stamp is not None:
            for old in target.parent.glob(f".{target.name}-prepared-*"):
                old.unlink(missing_ok=True)
            stamp.write_text(json.dumps({"error": None}))


def open_teacher(distill, data=None):
    """The teacher cache of loss.distill (None without distillation); `data` (the data section)
    is the training data its rebuild hint names."""
    training_data = None if data is None else (data.path, data.subsets)
    return None if distill is None else TeacherCache(distill["teacher_cache"], training_data)


def make_sampler(config, dataset):
    weights = None
    if config.data.subset_weights is not None:
        unknown = sorted(set(config.data.subset_weights) - set(dataset.names))
        if unknown:
            raise ConfigError(
                f"data.subset_weights names unknown subset(s) {', '.join(unknown)}; "
                f"training subsets: {', '.join(dataset.names)}"
            )
        weights = [float(config.data.subset_weights.get(name, 0.0)) for name in dataset.names]
    try:
        return Sampler(
            dataset.subset_sizes(),
            config.train.global_batch_size,
            config.train.seed,
            config.data.mixing,
            config.data.mixing_temperature,
            weights,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_lengths(config, llama_config):
    """Sequence lengths beyond the checkpoint's positions are a config error, not a silent
    extrapolation of RoPE."""
    limit = llama_config.max_position_embeddings
    for key in ("query_max_length", "passage_max_length"):
        if getattr(config.data, key) > limit:
            raise ConfigError(
                f"data.{key}={getattr(config.data, key)} exceeds the model's max_position_embeddings="
                f"{limit} ({config.model.path}/config.json)"
            )


def seed_everything(seed, rank):
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


@dataclass
class Run:
    """What the phases of train() share: the batch layout, the run folder, the data pipeline, the
    engine, and (rank 0) the TensorBoard writer."""

    config: object
    rank: int
    world: int
    ds_config: dict
    micro: int
    accumulation: int
    run_dir: Path
    resume_from: Path | None
    dataset: PreparedDataset
    sampler: Sampler
    tokenizer: object
    collator: object
    config_dict: dict
    group: object
    engine: object
    start: int = 0
    writer: object = None

    def save(self, step):
        """A checkpoint of `step` on every rank (a collective)."""
        save_checkpoint(
            self.engine,
            self.run_dir,
            step,
            stream_state(step, self.sampler, self.dataset, self.config.data.positive_sampling),
            self.config_dict,
            self.config.train.keep_checkpoints,
        )


def train(config, on_step=None):
    """Run training as configured, resuming per train.resume. Returns the engine (tests inspect
    it). `on_step(step, stats, examples)` is called on every rank after each optimizer step.

    The phases run on every rank in this order (their collectives must match), except the rank-0
    ones, which hold none."""
    run = set_up(config)
    if run.rank == 0:
        write_run_files(run)
    if run.resume_from is not None:
        run.start = load_state(run.engine, run.resume_from, config, run.world)
    if run.rank == 0:
        announce(run)
    train_steps(run, on_step)
    if run.writer is not None:
        run.writer.close()
    return run.engine


def train_command(config):
    """`embedtrain train`: train, then end the process on every rank (distributed.shutdown: after
    the last rank is done, without the interpreter's teardown)."""
    train(config)
    distributed.shutdown()


def set_up(config):
    """Every rank: config checks, seeding, the run folder (rank 0 finds the checkpoint to resume
    from), the dataset and its sampler, the collator, the negatives group and the engine."""
    rank, world, _ = distributed.init_distributed()
    ds_config = deepspeed_config(config, world)
    micro, accumulation = batch_layout(config, world)
    seed_everything(config.train.seed, rank)
    # Bad input must fail before the model is loaded and GPUs spin: model folder, checkpoint, data.
    check_lengths(config, read_model_config(config.model.path))
    run_dir = Path(config.train.output_dir)
    resume_from = distributed.run_on_main(lambda: prepare_run_dir(config, run_dir))
    token = distributed.check_shared_folder(run_dir)  # before step 1: every rank writes shards there
    if resume_from is not None:  # data order and LR schedule unchanged (or changed as asked), before any load
        check_resume(resume_from, config)
    dataset = open_dataset(config.data, run_dir, token)
    dataset.require_negatives(config.loss.hard_negatives)  # before the engine, not in a DataLoader worker
    sampler = make_sampler(config, dataset)
    tokenizer = load_tokenizer(config.model.path, config.model.padding_side)
    teacher = open_teacher(config.loss.distill, config.data)
    collator = make_collator(config, tokenizer, dataset, teacher)
    config_dict = config.to_dict()
    group = distributed.negatives_group(config.loss.gather_group_size) if config.loss.negatives == "global" else None
    engine = build_engine(config, ds_config, teacher_dim=teacher.dim if teacher is not None else None)
    return Run(
        config=config,
        rank=rank,
        world=world,
        ds_config=ds_config,
        micro=micro,
        accumulation=accumulation,
        run_dir=run_dir,
        resume_from=resume_from,
        dataset=dataset,
        sampler=sampler,
        tokenizer=tokenizer,
        collator=collator,
        config_dict=config_dict,
        group=group,
        engine=engine,
    )


def make_collator(config, tokenizer, dataset, teacher=None):
    """The model kind's collator of training batches (embedtrain.kinds)."""
    one_row = packs_in_one_row(config.model.attn_implementation)  # data.pack_length 0: one row per call
    return kind_of(config).make_collator(tokenizer, config, dataset.info, one_row, teacher)


def write_run_files(run):
    """Rank 0: <run>/base_model (what an export needs besides the weights, with the model kind's
    own files) and deepspeed.json."""
    extras = kind_of(run.config).base_model_files(run.config)
    write_base_model(run.run_dir, run.engine.module.backbone.config, run.tokenizer, run.collator.policy, extras)
    write_deepspeed_config(run.run_dir, run.ds_config)


def announce(run):
    """Rank 0, after the resume: the TensorBoard writer (purged past the resume point) and the
    start-up line."""
    config = run.config
    run.writer = make_writer(config, run.run_dir, run.start)
    print(
        describe_run(
            config, run.world, run.micro, run.accumulation, run.dataset, run.ds_config, run.resume_from, run.start
        ),
        flush=True,
    )


def train_steps(run, on_step):
    """Every rank: the optimizer steps from run.start to train.max_steps, with logging, evaluation,
    checkpoints (every train.save_every steps and train.save_every_minutes) and stop requests
    (SIGTERM, Ctrl-C: StopRequest) at their intervals."""
    config, engine = run.config, run.engine
    eval_sources = open_eval_sources(config, run.collator)
    stop = StopRequest(run.rank, config.train.save_every_minutes)
    flops = FlopsCounter(engine.module.backbone.config, config.model.lora)
    window = new_window()
    skipped = engine.skipped_steps
    try:
        for step, micro_batches, examples in make_loader(run):
            step_stats = optimizer_step(engine, micro_batches, config, run.accumulation, run.group, window, flops)
            if on_step is not None:
                on_step(step, {key: float(value) for key, value in step_stats.items()}, examples)
            done = step + 1
            skipped = check_skipped_steps(engine, skipped, done, config, run.save)
            stopping, save_now = stop.poll(done) if done % config.train.stop_check_every == 0 else (False, False)
            logged = done % config.logging.every == 0 or done == config.train.max_steps
            if logged:
                log_window(engine, run.writer, done, step_stats, window, config)
            if stopping:  # no evaluation: the grace period is for the checkpoint
                run.save(done)
                if run.rank == 0:
                    print(f"[embedtrain] stop requested ({stop.reason()}): saved step {done}, exiting", flush=True)
                break
            if eval_sources is not None and (
                done == config.train.max_steps or (config.eval.every and done % config.eval.every == 0)
            ):
                evaluate(engine, run.tokenizer, eval_sources, config, run.writer, done)
            scheduled = config.train.save_every and done % config.train.save_every == 0
            if done == config.train.max_steps or scheduled or save_now:
                run.save(done)
                stop.saved(done)
            if logged:
                window = new_window()  # after evaluation and saving: the window times training steps only
        stop.finish()  # no reduction left in flight (an error leaves without it: a peer may be gone)
    finally:
        stop.restore()


def open_eval_sources(config, collator):
    """The held-out texts of eval.path (None without it), rendered as the model sees them."""
    return kind_of(config).eval_sources(config, collator) if config.eval.path else None


def make_loader(run):
    """The step batches from run.start, each rank's share, through a DataLoader."""
    config = run.config
    batches = StepBatches(
        run.dataset,
        run.sampler,
        run.collator,
        run.rank,
        run.world,
        run.micro,
        config.loss.hard_negatives,
        start=run.start,
        stop=config.train.max_steps,
        length_bucketing=config.data.length_bucketing,
        positive_sampling=config.data.positive_sampling,
        micro_batch_tokens=config.train.micro_batch_tokens,
        budget_chunks=budget_chunks(config),
    )
    # its own generator: otherwise starting the iterator draws from the global RNG, after a resume's
    # restore_rng, and dropout (model.lora.dropout) would differ from the uninterrupted run
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=config.data.num_workers,
        generator=torch.Generator().manual_seed(config.train.seed + run.rank),
        worker_init_fn=ignore_stop_signals,
        # page-locked host batches: their copy to the GPU is asynchronous (non_blocking) and faster
        pin_memory=torch.cuda.is_available(),
    )


def describe_run(config, world, micro, accumulation, dataset, ds_config, resume_from, start):
    """The start-up line: batch layout, data, GradCache, ZeRO stage, resume point."""
    chunk = config.train.grad_cache_chunk_size
    return (
        f"[embedtrain] {world} rank(s), global batch {config.train.global_batch_size} = micro {micro} x "
        f"accumulation {accumulation} x world {world}; {len(dataset)} queries from {len(dataset.names)} "
        f"subset(s)"
        + (f"; GradCache chunks of {chunk}" if chunk else "")
        + token_budget_note(config)
        + zero_note(config, ds_config)
        + (f"; resumed from {resume_from} at step {start}" if resume_from else "")
        + auto_note(config, ds_config)
    )


def zero_note(config, ds_config):
    """describe_run's words for the ZeRO stage and recompute."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return f"; ZeRO stage {stage}; {describe_checkpointing(checkpoint_every(config, ds_config))}"


def auto_note(config, ds_config):
    """With `auto`, a second start-up line: what was chosen and why (the decision `embedtrain plan`
    prints; recorded in <run>/deepspeed.json)."""
    auto = ds_config.get(AUTO_KEY)
    if auto is None:
        return ""
    return (
        f"\n[embedtrain] auto (deepspeed.config={auto['deepspeed_config']}, train.activation_checkpointing="
        f"{config.train.activation_checkpointing}): {auto['reason'] if auto['fits'] else 'WARNING: ' + auto['reason']}"
    )


def token_budget_note(config):
    """describe_run's words for train.micro_batch_tokens."""
    tokens = config.train.micro_batch_tokens
    if not tokens:
        return ""
    if budget_chunks(config):
        micro = config.train.micro_batch_size
        return f"; GradCache chunks of at most {tokens:,} tokens (the contrastive batch stays {micro} queries)"
    return f"; micro-steps of at most {tokens:,} tokens (whole queries; each rank's share re-cut by tokens)"


def budget_chunks(config):
    """Whether train.micro_batch_tokens sizes GradCache chunks (local/global pools: the contrastive
    batch must stay train.micro_batch_size queries) rather than micro-steps (group pool, rerankers:
    each query's loss needs only its own passages, so any cut in whole queries is exact)."""
    return kind_of(config).budget_chunks(config)


def optimizer_step(engine, micro_batches, config, accumulation, group=None, window=None, flops=None):
    """Backward over the step's micro-batches, DeepSpeed steps (the optimizer updates once, after the
    last micro-batch: its boundary is set explicitly, grad_cache.set_boundary); returns the step's
    mean stats as device tensors (no host sync: they are read at logging steps only) and adds the
    step's token and FLOP counts to `window` (with `flops`, a FlopsCounter). `group`, `window` and
    `flops` are optional: tools/bench.py calls `optimizer_step(engine, micro_batches, config,
    accumulation)`, the loop's exact step without its accounting.

    Each micro-batch's loss is weighted by its share of the rank's queries in the step, so the
    gradient is the mean over the rank's share whether it came as `accumulation` equal micro-batches
    or as token-budget micro-steps of varying size (train.micro_batch_tokens); DeepSpeed's average
    over ranks (equal shares) makes it the global batch's mean."""
    step_stats, kind = {}, kind_of(config)
    queries = [micro_batch_queries(batch) for batch in micro_batches]
    for index, batch in enumerate(micro_batches):
        divisor = sum(queries) / queries[index]  # = accumulation for equal micro-batches
        boundary = index == len(micro_batches) - 1
        loss, stats = kind.backward(engine, batch, config, divisor, group, boundary)
        engine.step()
        for key, value in {"loss": loss, **stats}.items():
            step_stats[key] = step_stats.get(key, 0.0) + value.detach().float() / divisor
        if window is not None:
            add_counts(window, batch, flops)
    if window is not None:
        window["steps"] += 1
        for key, value in step_stats.items():  # summed on the device: read at the logging step only
            window["stats"][key] = window["stats"].get(key, 0.0) + value
    step_stats["skipped_steps"] = torch.tensor(float(engine.skipped_steps))
    return step_stats


def add_counts(window, batch, flops):
    """A micro-batch's token and FLOP counts into `window`, counted on the host from the CPU batch
    (no device sync)."""
    for part in encoder_parts(batch):
        window["tokens"] += part["tokens"]
        window["real_tokens"] += part["real_tokens"]
        window["flops"] += flops.of(part)


class FlopsCounter:
    """Model FLOPs of a training step (forward and backward, no recompute): 6 x non-embedding
    parameters per token plus the attention term 12 x layers x attention width (heads x head_dim,
    the hidden size for Llama) x the token's sequence length (Chinchilla/PaLM accounting;
    docs/benchmarks.md), over real tokens only. With LoRA the frozen base has no weight gradients:
    4 x parameters + 6 x adapter parameters (embedtrain.shape)."""

    def __init__(self, backbone_config, lora=None):
        self.shape, self.lora = Shape.from_config(backbone_config.to_dict()), lora

    def of(self, part):
        return self.shape.training_flops(part["real_tokens"], part["squared_lengths"], self.lora)


def check_skipped_steps(engine, seen, done, config, save):
    """DeepSpeed discards an update whose gradient norm is NaN or inf (a NaN loss gives one): warn,
    and past train.max_skipped_steps save and stop. Returns the new count."""
    skipped = engine.skipped_steps
    if skipped == seen:
        return skipped
    limit = config.train.max_skipped_steps
    if distributed.is_main_process():
        print(
            f"[embedtrain] warning: step {done} skipped: non-finite loss or gradient ({skipped} skipped so far, "
            f"limit train.max_skipped_steps={limit})",
            flush=True,
        )
    if skipped > limit:
        save(done)
        folder = checkpoint_root(Path(config.train.output_dir)) / f"step_{done}"
        raise TrainingError(
            f"{skipped} steps skipped for non-finite losses or gradients, more than "
            f"train.max_skipped_steps={limit}; stopped at step {done} with a checkpoint in {folder}. "
            "Check the learning rate, the data around these steps, and bf16 overflow."
        )
    return skipped


def evaluate(engine, tokenizer, eval_sources, config, writer, step):
    """In-training evaluation on every rank (the model kind's: a reranker reranks each held-out
    query's pos_doc + neg_doc, train/evaluation.py); rank 0 prints and logs the results."""
    kind = kind_of(config)
    results = kind.evaluate(engine, tokenizer, eval_sources, config)
    if results is None:
        return
    mean = results["mean"]
    print(
        f"[embedtrain] eval at step {step}: nDCG@10 {mean['ndcg@10']:.4f}  Recall@10 "
        f"{mean['recall@10']:.4f}  MRR@10 {mean['mrr@10']:.4f}" + kind.eval_note,
        flush=True,
    )
    if writer is not None:
        for subset, values in results.items():
            for key, value in values.items():
                writer.add_scalar(f"eval/{subset}/{key}", value, step)
        writer.flush()


def new_window():
    """The logging window's running sums: every step stat (loss, accuracy, distillation terms, ...),
    tokens and FLOPs, so that the logged values are all means over the same steps."""
    return {"stats": {}, "tokens": 0, "real_tokens": 0, "flops": 0, "start": time.perf_counter(), "steps": 0}


class StopRequest:
    """SIGTERM (Slurm's time-limit warning or preemption, scancel, a launcher shutting down) or a
    first Ctrl-C (SIGINT) asks to stop: the step in flight finishes, every rank agrees, a checkpoint
    is written, and training returns normally (exit 0). A second Ctrl-C, at least
    REPEAT_SECONDS after the first, ends the process at once with code 130 and saves nothing; an
    earlier one is taken for the same key press, which torchrun and the deepspeed launcher forward
    to the workers a few milliseconds after the terminal delivered it.

    Ranks agree without a blocking host sync per step: `poll` (every train.stop_check_every steps)
    starts a non-blocking MAX all-reduce of [this rank's stop flag, save now] and reads the one
    started at the previous poll (distributed.DeferredMax). A signal that lands during step t is
    acted on at the end of step t + 1 (with stop_check_every 1), on every rank at the same step.
    "Save now" is train.save_every_minutes measured on rank 0's clock only: ranks never decide a
    save on their own clocks, which disagree."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_SECONDS = 2.0

    def __init__(self, rank=0, save_every_minutes=0.0):
        self.rank = rank
        self.period = 60.0 * save_every_minutes
        self.received = None  # the first signal's name
        self.interrupted = None  # when the first Ctrl-C came (time.monotonic)
        self.last_save = time.monotonic()
        self.saved_step = -1
        self.flags = distributed.DeferredMax()
        self.started = None  # the step whose flags are in flight
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self.interrupted is not None and now - self.interrupted >= self.REPEAT_SECONDS:
                os.write(2, b"[embedtrain] second Ctrl-C: aborted, nothing saved\n")
                os._exit(130)  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C
            if self.interrupted is None:
                self.interrupted = now
                if self.rank == 0:
                    os.write(
                        2,
                        b"[embedtrain] Ctrl-C: saving a checkpoint after this step, then exiting "
                        b"(Ctrl-C again to abort without saving)\n",
                    )
        self.received = self.received or signal.Signals(signum).name

    def poll(self, step):
        """(stop, save now), the same on every rank; call it at the same steps on every rank."""
        due = self.rank == 0 and self.period > 0 and time.monotonic() - self.last_save >= self.period
        agreed = self.flags.exchange([int(self.received is not None), int(due)])
        started, self.started = self.started, step
        if agreed is None:
            return False, False
        # a save since the flags were sent already answered rank 0's clock
        return bool(agreed[0]), bool(agreed[1]) and self.saved_step < started

    def saved(self, step):
        self.saved_step = step
        self.last_save = time.monotonic()

    def reason(self):
        return self.received or "a signal to another rank"

    def finish(self):
        self.flags.finish()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id):
    """DataLoader worker start-up: leave SIGTERM and SIGINT to the training process. Slurm signals
    every process of a job step and Ctrl-C every process of the terminal's group; a worker that died
    of it would end the run through the DataLoader's check on its workers, before the stop's save.
    Workers end with their parent."""
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def prepare_run_dir(config, run_dir):
    """Rank 0: find the checkpoint to resume from (or refuse), create the run folder, check that it
    is writable, save the resolved config."""
    resume_from = resume_checkpoint(config.train.resume, run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"train.output_dir: cannot write to {run_dir}: {err.strerror}") from err
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return resume_from


def load_state(engine, folder, config, world):
    """Restore model, optimizer, scheduler, step and RNG from a checkpoint folder; returns the step."""
    # DeepSpeed unpickles its files with weights_only=False: first prove the ones this rank reads
    # load with weights_only=True (tensors, plain containers and DeepSpeed's three classes only);
    # each rank reads its own files only, and checks that every rank's shards are there.
    saved = own_resume_files(folder, engine.global_rank)
    check_stage_resume(engine, folder, saved)
    stage = engine.zero_optimization_stage()
    if saved["dp_world_size"] != world and stage != 3:
        raise CheckpointError(
            f"{folder} was written by {saved['dp_world_size']} rank(s) and this run has {world}: resuming on another "
            f"world size is supported under ZeRO-3 only (this run uses ZeRO stage {stage}). Resume on "
            f"{saved['dp_world_size']} rank(s), or export the checkpoint and start a new run from the export "
            "(the optimizer state is then lost)"
        )
    check_lora_resume(engine, folder, saved, config)
    try:
        if saved["dp_world_size"] == world:
            _, client = engine.load_checkpoint(
                str(folder.parent),
                tag=folder.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=config.model.lora is None,  # a LoRA checkpoint lacks the frozen base
            )
        else:
            client = load_resharded(engine, folder)
    except (RuntimeError, KeyError, ValueError, AssertionError) as err:
        raise CheckpointError(f"{folder} does not match this model ({config.model.path}): {err}") from err
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}")
    restore_rng(client["rng"])
    return client["step"]


def make_writer(config, run_dir, start_step):
    """TensorBoard writer; after a resume, points past the checkpoint are purged so curves continue."""
    if not config.logging.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)


DISTILL_TERMS = (  # (name in the log line, TensorBoard scalar): the distillation loss's terms
    ("contrastive", "train/loss_contrastive"),
    ("cos", "train/distill_cosine"),
    ("mse", "train/distill_mse"),
    ("kl", "train/distill_kl"),
)


SPARSE_TERMS = (  # (name in the log line, TensorBoard scalar, format): a sparse model's sparsity
    ("nnz q", "train/nonzero_query", ".1f"),  # mean terms with weight > 0 per query
    ("nnz d", "train/nonzero_document", ".1f"),  # per document (passage)
    ("flops", "train/flops_loss", ".4f"),  # the weighted FLOPS terms in the loss (train/sparse_loss.py)
)


def sparsity_text(scalars):
    """The log line's sparsity figures, for the stats that the step reported (a sparse model's)."""
    return "".join(f"  {name} {scalars[key]:{spec}}" for name, key, spec in SPARSE_TERMS if key in scalars)


def loss_text(loss, scalars):
    """The log line's loss and, under distillation, its terms: all means over the same logging
    window (new_window), so the weighted terms add up to the loss."""
    terms = " ".join(f"{name} {scalars[key]:.4f}" for name, key in DISTILL_TERMS if key in scalars)
    return f"loss {loss:.4f} ({terms})" if terms else f"loss {loss:.4f}"


def log_window(engine, writer, done, step_stats, window, config):
    """Console line and TensorBoard scalars; all ranks join the reductions, rank 0 writes. This is
    where device values are read (one sync per logging step)."""
    elapsed = time.perf_counter() - window["start"]
    world = distributed.world_size()
    means = {key: float(value) / window["steps"] for key, value in window["stats"].items()}
    loss = distributed.all_reduce_mean(means["loss"])
    tokens, real, flops = (
        distributed.all_reduce_mean(window[key]) * world for key in ("tokens", "real_tokens", "flops")
    )
    step_time = elapsed / window["steps"]
    scalars = {
        "train/loss": loss,
        "train/lr": engine.get_lr()[0],
        "perf/tokens_per_s": tokens / elapsed,
        "perf/real_tokens_per_s": real / elapsed,
        "perf/padding_efficiency": real / max(1, tokens),
        "perf/step_time_s": step_time,
        "perf/mfu": flops / elapsed / (world * config.logging.peak_tflops * 1e12),
    }
    if torch.cuda.is_available():
        scalars["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    for key, value in means.items():
        if key not in ("loss", "skipped_steps"):
            scalars[f"train/{key}"] = distributed.all_reduce_mean(value)
    scalars["train/skipped_steps"] = distributed.all_reduce_mean(float(step_stats["skipped_steps"]))  # a count
    if distributed.is_main_process():
        eta = format_duration(step_time * (config.train.max_steps - done))
        on_gpu = "perf/peak_memory_gib" in scalars  # MFU against a GPU's peak means nothing on the CPU
        device = f"  MFU {scalars['perf/mfu']:.1%}  {scalars['perf/peak_memory_gib']:.1f} GiB" if on_gpu else ""
        print(  # distillation: its terms too, so runs with different weights can be compared
            f"[embedtrain] step {done}: {loss_text(loss, scalars)}  "
            f"acc {scalars.get('train/accuracy', 0):.3f}{sparsity_text(scalars)}  "
            f"lr {scalars['train/lr']:.2e}  {scalars['perf/tokens_per_s']:,.0f} tok/s  "
            f"{scalars['perf/real_tokens_per_s']:,.0f} real tok/s  pad-eff {scalars['perf/padding_efficiency']:.3f}  "
            f"{step_time:.2f} s/step{device}  ETA {eta}",
            flush=True,
        )
        if writer is not None:
            for key, value in scalars.items():
                writer.add_scalar(key, value, done)
            writer.flush()


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
