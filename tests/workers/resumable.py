"""Train the tiny recipe (fp32, 1 rank unless launched with more) and record every step's examples;
optionally die by SIGKILL after a given step or in the middle of a checkpoint save.

    python tests/workers/resumable.py --run-dir RUN --records r.jsonl [--kill-after-step K] [--kill-in-save N]

--embed-out FILE: after training, rank 0 saves (torch.save) the in-memory LoRA adapter (gathered from
every rank) and the in-process embeddings of EMBED_TEXTS, to compare with what was saved and exported.
"""

import argparse
import json
import os
import signal

import torch

from embedtrain import distributed
from embedtrain.config import load_config
from embedtrain.train import checkpoint
from embedtrain.train.loop import train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kill-after-step", type=int, default=None, help="0-based step index")
    parser.add_argument("--kill-in-save", type=int, default=None, help="step number whose save is interrupted")
    parser.add_argument("--disk-full-in-save", type=int, default=None, help="step whose save hits ENOSPC")
    parser.add_argument("--nan-at", default="", help="comma-separated step indices whose loss is made NaN")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--embed-out", default=None, help="save the in-memory adapter and embeddings here")
    args = parser.parse_args()
    config = load_config(
        "tiny",
        [
            f"train.max_steps={args.steps}",
            "train.save_every=2",
            "train.keep_checkpoints=0",
            "logging.every=1",
            *args.overrides,
        ],
        output_dir=args.run_dir,
    )

    if args.kill_in_save is not None:
        publish = checkpoint.publish_checkpoint

        def publish_then_die(root, tag, *rest):
            if tag == f"step_{args.kill_in_save}":
                os.kill(os.getpid(), signal.SIGKILL)  # DeepSpeed's files are written, ours are not
            return publish(root, tag, *rest)

        checkpoint.publish_checkpoint = publish_then_die

    if args.disk_full_in_save is not None:
        import errno

        real_save = torch.save

        def save_or_fail(obj, path, *rest, **kwargs):
            if f"step_{args.disk_full_in_save}" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_save(obj, path, *rest, **kwargs)

        torch.save = save_or_fail

    if args.nan_at:
        from embedtrain.train import step as step_module

        nan_steps, real_loss, calls = {int(s) for s in args.nan_at.split(",")}, step_module.contrastive_loss, [0]
        micro_per_step = (
            config.train.global_batch_size // config.train.micro_batch_size // max(1, distributed.world_size())
        )

        def loss_with_nan(*a, **k):
            loss, stats = real_loss(*a, **k)
            step = calls[0] // micro_per_step
            calls[0] += 1
            return (loss * float("nan"), stats) if step in nan_steps else (loss, stats)

        step_module.contrastive_loss = loss_with_nan

    engine_box = []

    def checksum():
        """Sum of every full parameter (gathered from the ZeRO-3 partitions)."""
        import deepspeed

        if not engine_box:
            return None
        params = list(engine_box[0].module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return float(sum(p.double().sum() for p in params))

    def record(step, stats, micro_batches):
        # every rank's examples, in global order: micro-batch m of rank 0, of rank 1, ...
        mine = [[e.subset + "/" + e.question_id for e in m] for m in micro_batches]
        every_rank = [mine]
        if distributed.world_size() > 1:
            every_rank = [None] * distributed.world_size()
            torch.distributed.all_gather_object(every_rank, mine)
        ids = [q for m in range(len(mine)) for ranks in every_rank for q in ranks[m]]
        total = checksum()  # a collective under ZeRO-3: every rank takes part
        if distributed.rank() == 0:
            with open(args.records, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": stats["loss"],
                            "pid": os.getpid(),
                            "ids": ids,
                            "skipped": stats["skipped_steps"],
                            "checksum": total,
                        }
                    )
                    + "\n"
                )
                f.flush()
                os.fsync(f.fileno())
        if step == args.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    from embedtrain.train import engine as engine_module
    from embedtrain.train.checkpoint import CheckpointError
    from embedtrain.train.loop import TrainingError

    build = engine_module.build_engine

    def build_and_keep(*a, **k):
        engine_box.append(build(*a, **k))
        return engine_box[-1]

    import embedtrain.train.loop as loop_module

    loop_module.build_engine = build_and_keep
    try:
        train(config, on_step=record)
    except (CheckpointError, TrainingError) as err:
        print(f"embedtrain: error: {err}", flush=True)
        raise SystemExit(2) from err
    if args.embed_out:
        save_in_memory_model(engine_box[-1], config, args.embed_out)


EMBED_TEXTS = ["Shilin Linlofo is a chemist.", "A short one.", "Dorbra Ostmorven is an architect known for copper."]


def save_in_memory_model(engine, config, out):
    """Every rank: gather the adapter and embed EMBED_TEXTS (collectives under ZeRO-3); rank 0 saves."""
    from embedtrain.model.encoder import load_tokenizer
    from embedtrain.train.checkpoint import gather_adapter

    adapter = gather_adapter(engine) if config.model.lora is not None else {}
    batch = load_tokenizer(config.model.path, config.model.padding_side)(EMBED_TEXTS, padding=True, return_tensors="pt")
    engine.eval()
    with torch.no_grad():
        embeddings = engine(batch["input_ids"], batch["attention_mask"])
    if distributed.rank() == 0:
        torch.save({"adapter": adapter, "embeddings": embeddings.cpu(), "texts": EMBED_TEXTS}, out)


if __name__ == "__main__":
    main()
    distributed.shutdown()
