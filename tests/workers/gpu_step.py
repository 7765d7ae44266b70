"""bf16 DeepSpeed ZeRO-3 on the accelerator (1 rank): gradient parity with an fp32 step, and the
non-finite guard. tests/test_gpu.py runs it; on a CPU-only machine it runs on the CPU.

    python tests/workers/gpu_step.py --out r.json --mode parity   # bf16 engine vs fp32 plain PyTorch
    python tests/workers/gpu_step.py --out r.json --mode nan      # a NaN-loss step is skipped and counted

parity: the engine (bf16 weights and activations, fp32 master weights, checkpointing) computes the
gradient of global batch 0; the reference is a plain fp32 Encoder on the same device whose weights
are the engine's bf16 weights cast to fp32, so the difference is arithmetic precision only, not the
rounding of the weights. Written: loss of each, relative L2 error of the whole gradient and of
each tensor, cosine of the whole gradient.

nan: step 1 normal, step 2 with its loss multiplied by NaN, step 3 normal. Written: skipped_steps
after each step, whether the weights changed at each step and whether they are all finite.
"""

import argparse
import json
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from embedtrain import distributed
from embedtrain.config import deepspeed_config, load_config
from embedtrain.data.collate import Collator
from embedtrain.data.stream import Sampler, rank_micro_batches
from embedtrain.model.encoder import load_tokenizer
from embedtrain.train.engine import build_encoder, build_engine
from embedtrain.train.loop import open_dataset
from embedtrain.train.step import contrastive_loss

MICRO = 4


def full_weights(engine):
    """Every parameter gathered from its ZeRO-3 partitions, as fp32 copies on the CPU."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().float().cpu().clone() for name, p in params.items()}


def batches(config, steps):
    """`steps` global batches of the tiny recipe's stream (1 rank: one micro-batch each)."""
    dataset = open_dataset(config.data, config.train.output_dir)
    collator = Collator(load_tokenizer(config.model.path), config.data, dataset.info)
    sampler = Sampler(dataset.subset_sizes(), MICRO, config.train.seed)
    return [
        collator([dataset.example(i, config.loss.hard_negatives) for i in micro])
        for step in range(steps)
        for micro in rank_micro_batches(sampler.global_batch(step), 0, 1, MICRO)
    ]


def parity(engine, config, batch):
    loss, _ = contrastive_loss(engine, batch, config.loss, engine.device)
    engine.backward(loss)
    grads = {name: safe_get_full_grad(p).detach().float().cpu() for name, p in engine.module.named_parameters()}
    weights = full_weights(engine)  # the bf16 weights the engine computed with, as fp32

    config.train.activation_checkpointing = False
    reference = build_encoder(config, torch.float32).to(engine.device)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(weights[name])
    ref_loss, _ = contrastive_loss(reference, batch, config.loss, engine.device)
    ref_loss.backward()
    ref = {name: p.grad.detach().float().cpu() for name, p in reference.named_parameters()}

    per_tensor = {name: float((grads[name] - r).norm() / r.norm().clamp(min=1e-12)) for name, r in ref.items()}
    flat, flat_ref = torch.cat([grads[n].flatten() for n in ref]), torch.cat([r.flatten() for r in ref.values()])
    worst = max(per_tensor, key=per_tensor.get)
    return {
        "ds_loss": loss.item(),
        "ref_loss": ref_loss.item(),
        "total_rel_error": float((flat - flat_ref).norm() / flat_ref.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0)),
        "max_rel_error": per_tensor[worst],
        "worst_param": worst,
        "per_tensor": per_tensor,
        "param_dtype": str(next(engine.module.parameters()).dtype),
    }


def non_finite_guard(engine, config, steps):
    record = {"skipped": [], "changed": [], "finite": [], "losses": []}
    before = full_weights(engine)
    for index, batch in enumerate(steps):
        loss, _ = contrastive_loss(engine, batch, config.loss, engine.device)
        if index == 1:
            loss = loss * float("nan")  # as tests/workers/resumable.py --nan-at does
        engine.backward(loss)
        engine.step()
        after = full_weights(engine)
        record["losses"].append(loss.item())
        record["skipped"].append(int(engine.skipped_steps))
        record["changed"].append(any(not torch.equal(before[n], after[n]) for n in after))
        record["finite"].append(all(bool(torch.isfinite(w).all()) for w in after.values()))
        before = after
    record["param_dtype"] = str(next(engine.module.parameters()).dtype)
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["parity", "nan"], required=True)
    args = parser.parse_args()

    distributed.init_distributed()
    overrides = [
        f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={MICRO}",
        "deepspeed.bf16.enabled=true",
        "optim.warmup_steps=1",
        "train.lr=1e-3",
    ]  # a visible update on the steps that are not skipped
    config = load_config("tiny", overrides, output_dir=str(Path(args.out).parent / "run"))
    torch.manual_seed(0)
    data = batches(config, 3 if args.mode == "nan" else 1)
    engine = build_engine(config, deepspeed_config(config, 1))
    result = parity(engine, config, data[0]) if args.mode == "parity" else non_finite_guard(engine, config, data)
    result["device"] = str(engine.device)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
    distributed.shutdown()
