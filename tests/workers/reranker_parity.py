"""Reranker gradient parity: W-rank DeepSpeed gradients vs a plain 1-process PyTorch step.

    torchrun --standalone --nproc_per_node 2 tests/workers/reranker_parity.py --out r.json
    torchrun --standalone --nproc_per_node 2 tests/workers/reranker_parity.py --out r.json --chunk 1
    torchrun --standalone --nproc_per_node 2 tests/workers/reranker_parity.py --out r.json --micro 4 --inbatch 2
    torchrun --standalone --nproc_per_node 2 tests/workers/reranker_parity.py --scenarios batch.json
                                          # several runs in one launch (tests/workers/scenario_batch.py)

Every rank runs DeepSpeed (tiny_reranker: ZeRO-3, checkpointing, packed pairs) on its share of
global batch 0 and reads the full gradient of every parameter (backbone and head) before the
optimizer step; every rank also runs a plain PairScorer (same initial weights, no DeepSpeed, no
checkpointing, padded pairs) on the whole global batch. Rank 0 writes the worst relative error.
With --inbatch N (loss.negatives=local, loss.inbatch_negatives=N) the negatives come from each
rank's micro-batch, so the plain step collates the same micro-batches (every rank's, unpacked) and
its loss is their mean: the global batch's loss as the training loop defines it.
"""

import argparse
import json
from pathlib import Path

import scenario_batch
import torch
from deepspeed.utils import safe_get_full_grad

from embedtrain import distributed
from embedtrain.config import deepspeed_config, load_config
from embedtrain.data.collate import PairCollator
from embedtrain.data.stream import Sampler, StepBatches
from embedtrain.model.encoder import load_tokenizer
from embedtrain.train.engine import build_encoder, build_engine
from embedtrain.train.loop import open_dataset
from embedtrain.train.step import reranker_backward, reranker_loss


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=0, help="train.grad_cache_chunk_size (queries per chunk)")
    parser.add_argument("--inbatch", type=int, default=0, help="loss.inbatch_negatives under loss.negatives=local")
    args = parser.parse_args(argv)

    rank, world, _ = distributed.init_distributed()
    global_batch = world * args.micro * args.accumulation
    overrides = [
        f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={global_batch}",
        f"train.grad_cache_chunk_size={args.chunk}",
        "data.pair_max_length=48",
    ]
    if args.inbatch:
        overrides += ["loss.negatives=local", f"loss.inbatch_negatives={args.inbatch}"]
    config = load_config("tiny_reranker", overrides, output_dir=str(Path(args.out).parent / "run"))
    torch.manual_seed(0)
    dataset = open_dataset(config.data, config.train.output_dir)
    tokenizer = load_tokenizer(config.model.path)
    sampler = Sampler(dataset.subset_sizes(), global_batch, 0)

    def micro_batches(rank_, world_, micro_, collator):
        stream = StepBatches(dataset, sampler, collator, rank_, world_, micro_, config.loss.hard_negatives, 0, 1)
        return [collator(examples) for examples in stream.examples(0)]

    engine = build_engine(config, deepspeed_config(config, world))
    inbatch = config.loss.inbatch_negatives
    collator = PairCollator(tokenizer, config.data, dataset.info, args.chunk, inbatch_negatives=inbatch)
    losses, group_sizes = [], []
    for index, batch in enumerate(micro_batches(rank, world, args.micro, collator)):
        group_sizes.append(batch["group_size"])
        loss, _ = reranker_backward(engine, batch, args.accumulation)
        if index < args.accumulation - 1:
            engine.step()  # inside the accumulation window: no update; the last step is left out
        losses.append(loss.item())
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}
    ds_loss = distributed.all_reduce_mean(sum(losses) / len(losses))

    config.train.activation_checkpointing = False
    reference = build_encoder(config, torch.float32)
    unpacked = type(config.data)(**{**vars(config.data), "packing": False})
    padded = PairCollator(tokenizer, unpacked, dataset.info, inbatch_negatives=inbatch)
    if inbatch:  # every rank's micro-batches, each its own in-batch pool
        reference_batches = [b for r in range(world) for b in micro_batches(r, world, args.micro, padded)]
    else:  # the global batch in accumulation parts of world x micro queries
        reference_batches = micro_batches(0, 1, world * args.micro, padded)
    ref_loss, parts = 0.0, len(reference_batches)
    for batch in reference_batches:
        loss, _ = reranker_loss(reference, batch, "cpu")
        (loss / parts).backward()
        ref_loss += loss.item() / parts
    errors = {
        name: float((grads[name] - p.grad).norm() / p.grad.norm().clamp(min=1e-12))
        for name, p in reference.named_parameters()
    }
    if rank == 0:
        worst = max(errors, key=errors.get)
        result = {
            "ds_loss": ds_loss,
            "ref_loss": ref_loss,
            "max_rel_error": errors[worst],
            "worst_param": worst,
            "head_rel_error": errors["head.weight"],
            "head_grad_norm": float(reference.head.weight.grad.norm()),
            "world": world,
            "micro_steps": engine.micro_steps,
            "group_sizes": group_sizes,
        }
        Path(args.out).write_text(json.dumps(result))
    engine.destroy()  # a batch's next scenario builds its own


scenario_entry = main  # what tests/workers/scenario_batch.py runs for an entry naming this worker

if __name__ == "__main__":
    scenario_batch.run(main)
    distributed.shutdown()
