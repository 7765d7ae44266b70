"""Gradient parity worker: W-rank DeepSpeed gradients vs a plain 1-process PyTorch step.

    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --out r.json --negatives global
    python tests/workers/grad_parity.py --out r.json --reentrant      # 1 rank, reentrant checkpointing

Every rank runs DeepSpeed on its share of global batch 0 and reads the full gradient of every
parameter before the optimizer step; every rank also runs the plain reference on the whole global
batch (micro-batch W x B, no DeepSpeed, no checkpointing). Rank 0 writes the worst relative error.
"""

import argparse
import json
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from embedtrain import distributed
from embedtrain.config import deepspeed_config, load_config
from embedtrain.data.collate import Collator, load_tokenizer
from embedtrain.data.nemotron import content_hash
from embedtrain.data.stream import Sampler, rank_micro_batches
from embedtrain.train import step as step_module
from embedtrain.train.engine import build_encoder, build_engine
from embedtrain.train.loop import open_dataset
from embedtrain.train.step import contrastive_loss, micro_batch_backward


def detached_gather(tensor, group=None, uniform=False):
    """The scheme the test must reject: gather without grad, put the local slice back."""
    pool = distributed.gather_no_grad(tensor.detach(), group)
    sizes = distributed.gather_sizes(tensor.shape[0], group)
    offset = sum(sizes[: distributed.rank()])
    return torch.cat([pool[:offset], tensor, pool[offset + tensor.shape[0] :]]), offset


def synthetic_passage(content, length):
    """`length` synthetic tokens less up to 255 (so lengths differ); they depend only on the
    passage (its content hash), not on how batches are cut."""
    generator = torch.Generator().manual_seed(content % 2**31)
    real = length - int(torch.randint(0, 256, (1,), generator=generator))
    return torch.randint(0, 1000, (real,), generator=generator).tolist()


def relative_errors(grads, reference):
    errors = {}
    for name, ref in reference.items():
        errors[name] = float((grads[name] - ref).norm() / ref.norm().clamp(min=1e-12))
    return errors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--negatives", default="group")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--reentrant", action="store_true")
    parser.add_argument("--detached", action="store_true")
    parser.add_argument("--query-negatives", action="store_true")
    parser.add_argument("--grad-cache", type=int, default=0, help="GradCache chunk size (queries)")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout (GradCache replays it)")
    parser.add_argument("--no-replay", action="store_true", help="GradCache without RNG replay (must be caught)")
    parser.add_argument("--long", type=int, default=0, help="replace passages by synthetic ones of this many tokens")
    parser.add_argument("--matryoshka", action="store_true", help="loss summed over dims 16 and 64")
    parser.add_argument(
        "--reference-padded",
        action="store_true",
        help="the plain reference on padded batches (DeepSpeed's are packed, as configured)",
    )
    parser.add_argument("--compile", action="store_true", help="train.compile=true (DeepSpeed's engine.compile)")
    parser.add_argument(
        "--separate-forwards",
        action="store_true",
        help="queries and passages in two encoder forwards (the layout embedtrain does not use)",
    )
    args = parser.parse_args()

    rank, world, _ = distributed.init_distributed()
    global_batch = world * args.micro * args.accumulation
    overrides = [
        f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={global_batch}",
        f"loss.negatives={args.negatives}",
        f"loss.query_negatives={str(args.query_negatives).lower()}",
        "deepspeed.bf16.enabled=false",
        f"deepspeed.zero_optimization.stage={args.stage}",
        f"train.activation_checkpointing={str(not args.no_checkpointing).lower()}",
        f"train.grad_cache_chunk_size={args.grad_cache}",
        f"train.compile={str(args.compile).lower()}",
        *(["loss.matryoshka_dims=[16,64]", "loss.matryoshka_weights=[0.5,1.0]"] if args.matryoshka else []),
    ]
    # one folder for all ranks: rank 0 prepares the demo data there, every rank reads it
    config = load_config("tiny", overrides, output_dir=str(Path(args.out).parent / "run"))
    torch.manual_seed(0)
    dataset = open_dataset(config.data, config.train.output_dir)
    collator = Collator(load_tokenizer(config.model.path), config.data, dataset.info, args.grad_cache)
    indices = Sampler(dataset.subset_sizes(), global_batch, 0).global_batch(0)

    def batch_of(examples):
        if args.separate_forwards:  # two encoder calls: all queries, then all passages
            query_ids, passage_ids = collator.tokenize(examples)
            return {
                **collator(examples),
                "chunks": [collator.encoder_inputs(query_ids, len(query_ids)), collator.encoder_inputs(passage_ids, 0)],
            }
        if not args.long:
            return collator(examples)
        query_ids, _ = collator.tokenize(examples)  # every passage replaced by a long synthetic one
        passage_hash = [content_hash(p) for e in examples for p in e.passages]
        return collator.assemble(
            query_ids,
            [synthetic_passage(h, args.long) for h in passage_hash],
            [content_hash(e.passages[0]) for e in examples],
            passage_hash,
        )

    def micro_batches(rank_, world_, micro_):
        return [
            batch_of([dataset.example(i, config.loss.hard_negatives) for i in micro])
            for micro in rank_micro_batches(indices, rank_, world_, micro_)
        ]

    def reference_micro_batches():
        if args.reference_padded:
            collator.config = type(config.data)(**{**vars(config.data), "packing": False})
        return micro_batches(0, 1, world * args.micro)

    if args.no_replay:
        step_module.RngState.restore = lambda self: None
    if args.detached:
        distributed.gather_with_grad = detached_gather

    engine = build_engine(config, deepspeed_config(config, world), use_reentrant=args.reentrant)
    for layer in engine.module.backbone.layers:  # dropout makes the parity reference moot: replay only
        layer.self_attn.attention_dropout = args.dropout
    losses, replay = [], 0.0
    for index, batch in enumerate(micro_batches(rank, world, args.micro)):
        loss, stats = micro_batch_backward(engine, batch, config.loss, args.accumulation, args.grad_cache)
        if index < args.accumulation - 1:
            engine.step()  # inside the accumulation window: no update; the last step is left out
        losses.append(loss.item())
        replay = max(replay, float(stats.get("grad_cache_replay_error", 0.0)))
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}
    ds_loss = distributed.all_reduce_mean(sum(losses) / len(losses))

    config.train.activation_checkpointing = False
    config.train.compile = False
    config.loss.negatives = "local" if args.negatives == "global" else args.negatives
    reference = build_encoder(config, torch.float32)
    ref_loss = 0.0
    for batch in reference_micro_batches():
        loss, _ = contrastive_loss(reference, batch, config.loss, "cpu")
        (loss / args.accumulation).backward()
        ref_loss += loss.item() / args.accumulation
    errors = relative_errors(grads, {n: p.grad for n, p in reference.named_parameters()})
    if rank == 0:
        worst = max(errors, key=errors.get)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "ds_loss": ds_loss,
                    "ref_loss": ref_loss,
                    "max_rel_error": errors[worst],
                    "worst_param": worst,
                    "world": world,
                    "compiled": bool(getattr(engine, "is_compiled", False)),
                    "replay_error": replay,
                    "micro_steps": engine.micro_steps,
                    "ds_accumulation": engine.gradient_accumulation_steps(),
                },
                f,
            )


if __name__ == "__main__":
    main()
    distributed.shutdown()
