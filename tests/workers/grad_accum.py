"""bf16 gradient accumulation worker: for each ZeRO stage, the dtype of the engine's gradient
accumulation buffers and the error of one accumulated step against exact references.

    python tests/workers/grad_accum.py --out r.json                 # stages 1, 2, 3, 8 micro-steps
    python tests/workers/grad_accum.py --out r.json --stages 2 --accum bf16

Each scenario builds the engine as training does (load_config("tiny") with bf16 on, then
deepspeed_config and build_engine) with global batch 8 of micro-batch 1 (8 micro-steps), feeds it 8
different synthetic micro-batches and reads the full accumulated gradient before the optimizer step.
It is compared with two references built from the same bf16-rounded weights without DeepSpeed:
"exact", the fp64 sum of a plain bf16 model's own per-micro-step gradients (what accumulation alone
should give: any difference is accumulation rounding), and "fp32", the gradient of the same model run
in fp32 (bf16 compute and accumulation together). `--accum bf16` sets data_types.grad_accum_dtype=bf16
(DeepSpeed's default before embedtrain chose fp32); the default leaves the choice to deepspeed_config.
"""

import argparse
import json
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad

from embedtrain import distributed
from embedtrain.config import deepspeed_config, load_config
from embedtrain.train.engine import build_encoder, build_engine

MICRO_STEPS = 8
EXTRA = []
REFERENCES = {}


def micro_batches():
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(MICRO_STEPS):
        ids = torch.randint(3, 1000, (2, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, int(torch.randint(8, 24, (1,), generator=generator)) :] = 0
        batches.append((ids, mask))
    return batches


def loss_of(embeddings):
    """A loss whose gradient reaches every parameter, with terms of both signs."""
    weights = torch.linspace(-1, 1, embeddings.shape[-1], dtype=embeddings.dtype)
    return (embeddings @ weights).square().sum() + embeddings.sum()


def reference_gradients(config, dtype, batches):
    """{name: fp64 gradient} of the mean loss over the micro-batches, each micro-step's gradient
    computed in `dtype` from the bf16 weights and summed in fp64."""
    torch.manual_seed(0)
    encoder = build_encoder(config, torch.bfloat16, checkpointing=0)  # loaded as the engine loads it
    if dtype == torch.float32:
        encoder = encoder.float()  # the same weights upcast (Module.to(bf16) would round the fp32 rotary buffers)
    encoder.train()
    total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in encoder.named_parameters()}
    for ids, mask in batches:
        encoder.zero_grad()
        (loss_of(encoder(input_ids=ids, attention_mask=mask)) / MICRO_STEPS).backward()
        for name, parameter in encoder.named_parameters():
            total[name] += parameter.grad.double()
    return total


def accumulation_buffers(optimizer):
    """{attribute: dtype} of the buffers the stage's optimizer accumulates gradients in."""
    buffers = {}
    for attribute in ("fp32_groups_gradients_flat", "grads_in_partition", "grad_partitions_flat_buffer"):
        value = getattr(optimizer, attribute, None)
        if isinstance(value, torch.Tensor):
            buffers[attribute] = str(value.dtype)
        elif isinstance(value, list) and value:
            buffers[attribute] = str(value[0].dtype)
    for index, group in (getattr(optimizer, "averaged_gradients", None) or {}).items():
        flat = getattr(group, "flat_partition", None)
        if flat is not None:  # ZeRO-1/2's fp32 partition (stage_1_and_2.py, _build_compact_grad_partition_buffer)
            buffers[f"averaged_gradients[{index}]"] = str(flat.dtype)
    return buffers


def relative_error(grads, reference):
    diff = torch.cat([(grads[n].double() - ref).flatten() for n, ref in reference.items()])
    whole = torch.cat([ref.flatten() for ref in reference.values()])
    return float(diff.norm() / whole.norm())


def run_stage(stage, accum, out_dir):
    overrides = [
        "deepspeed.bf16.enabled=true",
        f"deepspeed.zero_optimization.stage={stage}",
        "train.global_batch_size=8",
        "train.micro_batch_size=1",
        "train.activation_checkpointing=false",
        "data.packing=false",
    ]
    if stage < 3:
        overrides.append("deepspeed.config=zero2.json")
    overrides += EXTRA
    if accum:
        overrides.append(f"deepspeed.data_types.grad_accum_dtype={accum}")
    config = load_config("tiny", overrides, output_dir=str(out_dir / f"run{stage}"))
    ds = deepspeed_config(config, 1)
    assert ds["gradient_accumulation_steps"] == MICRO_STEPS, ds
    batches = micro_batches()
    torch.manual_seed(0)
    engine = build_engine(config, ds)
    for index, (ids, mask) in enumerate(batches):
        engine.backward(loss_of(engine(input_ids=ids, attention_mask=mask)))
        if index < MICRO_STEPS - 1:
            engine.step()  # a micro-step inside the window (no update), as training calls it
    assert engine.is_gradient_accumulation_boundary()
    buffers = accumulation_buffers(engine.optimizer)
    grads = {name: safe_get_full_grad(p).detach().double() for name, p in engine.module.named_parameters()}
    engine.destroy()
    result = {
        "grad_accum_dtype": (ds.get("data_types") or {}).get("grad_accum_dtype"),
        "optimizer": type(engine.optimizer).__name__,
        "buffers": buffers,
        "grad_dtypes": sorted({str(g.dtype) for g in grads.values()}),
    }
    for kind, dtype in (("exact", torch.bfloat16), ("fp32", torch.float32)):
        if kind not in REFERENCES:  # the same model and data under every stage: computed once
            REFERENCES[kind] = reference_gradients(config, dtype, batches)
        result[f"error_vs_{kind}"] = relative_error(grads, REFERENCES[kind])
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--extra", action="append", default=[], help="more --set overrides (a probe)")
    parser.add_argument("--accum", default="", help="data_types.grad_accum_dtype to set (default: embedtrain's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    EXTRA.extend(args.extra)
    distributed.init_distributed()
    out = Path(args.out)
    results = {}
    for stage in map(int, args.stages.split(",")):
        for accum in [args.accum] if args.accum else ["", "bf16"]:
            results[f"zero{stage}_{accum or 'default'}"] = run_stage(stage, accum, out.parent)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
