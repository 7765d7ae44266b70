"""Token-budget parity worker: one optimizer step of train.loop.optimizer_step with
train.micro_batch_tokens against one plain PyTorch step on the whole global batch.

    python tests/workers/token_budget_parity.py --out r.json --scenarios group,local
    torchrun --standalone --nproc_per_node 2 tests/workers/token_budget_parity.py --out r.json \
        --scenarios group,global,reranker,distill

Each scenario builds its engine (fp32, the tiny recipes) and runs global batch 0 through the training
loop's optimizer_step, with DeepSpeed's step wrapped to read the full gradient of every parameter at
the accumulation boundary, just before the optimizer update. The reference is the plain model on the
whole global batch (group, reranker, distillation: one batch; local/global: each global micro-batch
of W x B queries as one local pool, divided by the accumulation, as in tests/workers/grad_parity.py).
Rank 0 writes, per scenario, the worst relative gradient error, the losses, the DeepSpeed gradient
norm against the reference's, the micro-step counts of every rank (and the counts before they were
equalised) and how often the optimizer stepped.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from grad_parity import SyntheticTeacher, relative_errors

from embedtrain import distributed
from embedtrain.config import batch_layout, deepspeed_config, load_config
from embedtrain.data.collate import Collator, PairCollator, encoder_parts
from embedtrain.data.stream import StepBatches, greedy_cut, rank_micro_batches
from embedtrain.model.encoder import load_tokenizer
from embedtrain.train import loop
from embedtrain.train.engine import build_encoder, build_engine
from embedtrain.train.loop import FlopsCounter, budget_chunks, make_sampler, new_window, open_dataset, optimizer_step
from embedtrain.train.step import contrastive_loss, micro_batch_queries, reranker_loss

# name -> (recipe, token budget, micro-batch queries per rank, global batch per rank, overrides)
SCENARIOS = {
    "group": ("tiny", 400, 4, 8, ["deepspeed.zero_optimization.stage=3"]),
    "local": ("tiny", 300, 4, 8, ["loss.negatives=local", "deepspeed.zero_optimization.stage=3"]),
    "global": ("tiny", 300, 4, 8, ["loss.negatives=global", "deepspeed.zero_optimization.stage=3"]),
    "reranker": ("tiny_reranker", 500, 4, 8, ["deepspeed.zero_optimization.stage=3"]),
    "distill": (
        "tiny",
        400,
        4,
        8,
        [
            "deepspeed.zero_optimization.stage=2",
            "loss.distill.teacher_cache=synthetic",
            "loss.distill.contrastive=0.5",
            "loss.distill.kl=1.0",
            "loss.distill.kl_temperature=0.1",
        ],
    ),
    "group_zero1": ("tiny", 400, 4, 8, ["deepspeed.zero_optimization.stage=1"]),
    # every micro-step weighted alike instead of by its queries: the check must fail
    "group_unweighted": ("tiny", 400, 4, 8, ["deepspeed.zero_optimization.stage=3"]),
}


def run(name, out_dir, world, rank):
    recipe, budget, micro, per_rank, extra = SCENARIOS[name]
    global_batch = per_rank * world
    config = load_config(
        recipe,
        [
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={global_batch}",
            f"train.micro_batch_tokens={budget}",
            "deepspeed.bf16.enabled=false",
            "deepspeed.gradient_clipping=1000.0",  # the norm is compared, not clipped
            *extra,
        ],
        output_dir=str(out_dir / "run"),
    )
    torch.manual_seed(0)
    dataset = open_dataset(config.data, config.train.output_dir)
    sampler = make_sampler(config, dataset)
    tokenizer = load_tokenizer(config.model.path)
    teacher = SyntheticTeacher() if config.loss.distill else None
    if config.model.kind == "reranker":
        collator = PairCollator(tokenizer, config.data, dataset.info)
    else:
        collator = Collator(tokenizer, config.data, dataset.info, teacher=teacher)
    chunks = budget_chunks(config)
    stream = StepBatches(
        dataset, sampler, collator, rank, world, micro, config.loss.hard_negatives, 0, 1,
        micro_batch_tokens=budget, budget_chunks=chunks,
    )  # fmt: skip
    _, batches, _ = next(iter(stream))

    draws = stream.global_draws(0)  # the counts before equalising, to show the test exercises it
    shares = [
        [e for m in rank_micro_batches(draws, r, world, micro) for e in stream._examples(m)] for r in range(world)
    ]
    tokens = [collator.example_tokens(share) for share in shares]
    if chunks:
        greedy = [[len(greedy_cut(t[a : a + micro], budget)) for a in range(0, per_rank, micro)] for t in tokens]
    else:
        greedy = [len(greedy_cut(t, budget)) for t in tokens]

    _, accumulation = batch_layout(config, world)
    engine = build_engine(config, deepspeed_config(config, world), teacher_dim=teacher.dim if teacher else None)
    captured, boundaries, original_step = {}, [], engine.step

    def step(*args, **kwargs):
        boundaries.append(bool(engine.is_gradient_accumulation_boundary()))
        if boundaries[-1]:
            for pname, param in engine.module.named_parameters():
                captured[pname] = safe_get_full_grad(param).detach().clone()
        return original_step(*args, **kwargs)

    engine.step = step
    group = distributed.negatives_group(0) if config.loss.negatives == "global" else None
    flops = FlopsCounter(engine.module.backbone.config)
    loop.micro_batch_queries = (lambda batch: 1) if name == "group_unweighted" else micro_batch_queries
    stats = optimizer_step(engine, batches, config, accumulation, group, new_window(), flops)
    ds_loss = distributed.all_reduce_mean(float(stats["loss"]))
    ds_norm = float(engine.get_global_grad_norm())
    calls = [len(encoder_parts(b)) for b in batches]
    counts = [calls]
    if world > 1:
        counts = [None] * world
        dist.all_gather_object(counts, calls)

    config.train.activation_checkpointing = False
    config.loss.negatives = "local" if config.loss.negatives == "global" else config.loss.negatives
    reference = build_encoder(config, torch.float32, teacher_dim=teacher.dim if teacher else None)
    plain = StepBatches(dataset, sampler, collator, 0, 1, micro * world, config.loss.hard_negatives, 0, 1)
    if config.loss.negatives == "group":  # any cut is exact: the whole global batch in one
        plain = StepBatches(dataset, sampler, collator, 0, 1, global_batch, config.loss.hard_negatives, 0, 1)
    ref_loss = 0.0
    references = [collator(examples) for examples in plain.examples(0)]
    for batch in references:
        if config.model.kind == "reranker":
            loss, _ = reranker_loss(reference, batch, "cpu")
        else:
            loss, _ = contrastive_loss(reference, batch, config.loss, "cpu")
        (loss / len(references)).backward()
        ref_loss += loss.item() / len(references)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    errors = relative_errors(captured, ref_grads)
    worst = max(errors, key=errors.get)
    ref_norm = float(torch.stack([g.norm() for g in ref_grads.values()]).norm())
    return {
        "max_rel_error": errors[worst],
        "worst_param": worst,
        "ds_loss": ds_loss,
        "ref_loss": ref_loss,
        "ds_grad_norm": ds_norm,
        "ref_grad_norm": ref_norm,
        "micro_steps": counts,  # per rank: encoder calls (chunks) of each micro-step
        "greedy_counts": greedy,
        "budget": budget,
        "chunked": chunks,
        "optimizer_steps": engine.global_steps,
        "boundaries": boundaries,
        "ds_micro_steps": engine.micro_steps,
        "real_tokens": [[p["real_tokens"] for p in encoder_parts(b)] for b in batches],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True, help="comma-separated: " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    rank, world, _ = distributed.init_distributed()
    results = {}
    for name in args.scenarios.split(","):
        results[name] = run(name, Path(args.out).parent / name, world, rank)
        results[name]["world"] = world
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
    distributed.shutdown()
