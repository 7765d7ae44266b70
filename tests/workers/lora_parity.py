"""LoRA gradient parity worker: W-rank DeepSpeed gradients of the adapter vs plain PyTorch with peft.

    torchrun --standalone --nproc_per_node 2 tests/workers/lora_parity.py --out r.json [--stage 2]
    torchrun --standalone --nproc_per_node 2 tests/workers/lora_parity.py --out r.json --grad-cache 2 --dropout 0.1
    torchrun --standalone --nproc_per_node 2 tests/workers/lora_parity.py --out r.json --multi-vector
    torchrun --standalone --nproc_per_node 2 tests/workers/lora_parity.py --scenarios batch.json
                                          # several runs in one launch (tests/workers/scenario_batch.py)

Every rank trains the tiny recipe with model.lora on its share of global batch 0 and reads the full
gradient of every parameter before the optimizer step; every rank also builds the reference: the
base from embedtrain.model.load_backbone, peft.get_peft_model with the same seed, and one plain
forward/backward on the whole global batch (no DeepSpeed, no checkpointing). After the optimizer
step it counts the optimizer state (the fp32 master partitions and Adam moments) over all ranks.
Rank 0 writes the worst relative error over the adapter weights and the counts.

--multi-vector instead trains tiny_colbert with model.lora for 2 steps through the training loop
(ZeRO-3, its checkpoint at step 2), then: the frozen base weights against model.path, the projection
against its seeded initial value, the optimizer state's size, the in-process module's token
embeddings against `embedtrain export`'s folder (both saved to embeddings.pt beside --out, for the
test to compare them and sentence-transformers' with), and a second run resumed from step_2 whose
gathered adapter and projection must be the saved ones.
"""

import argparse
import json
from pathlib import Path

import scenario_batch
import torch
from deepspeed.utils import safe_get_full_grad

from embedtrain import distributed
from embedtrain.config import deepspeed_config, load_config
from embedtrain.data.collate import Collator
from embedtrain.data.stream import Sampler, StepBatches
from embedtrain.model import Encoder, load_backbone
from embedtrain.model.encoder import load_tokenizer
from embedtrain.model.lora import lora_parameters
from embedtrain.train.checkpoint import gather_adapter
from embedtrain.train.engine import build_engine
from embedtrain.train.loop import open_dataset
from embedtrain.train.step import contrastive_loss, micro_batch_backward


def reference_encoder(config):
    """The base with peft's own wrapper (get_peft_model), seeded as training seeds the adapter."""
    from peft import LoraConfig, get_peft_model

    lora = config.model.lora
    backbone = load_backbone(config.model.path, attn_implementation=config.model.attn_implementation)
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        model = get_peft_model(backbone, peft_config)
    return Encoder(model, config.model.pooling, config.model.normalize), model


def optimizer_state_numel(engine):
    """(fp32 master numel, Adam moment numel, number of state tensors) of this rank's optimizer."""
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is None:
        flats = engine.optimizer.single_partition_of_fp32_groups  # ZeRO-1/2
    masters = sum(flat.numel() for flat in flats)
    inner = engine.optimizer.optimizer  # the torch AdamW over those flat partitions
    moments = [t for state in inner.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    return masters, sum(t.numel() for t in moments), len(moments)


QUERIES = ["Who is Shilin Linlofo?", "Which architect works with copper, and where?"]
PASSAGES = [
    "Shilin Linlofo is a chemist.",
    "Dorbra Ostmorven (born 1948 in Bergen) is an architect best known for works made of copper.",
]


def multi_vector_lora(args):
    """The --multi-vector scenario (module docstring); returns rank 0's result, None elsewhere."""
    import deepspeed

    from embedtrain.export import export_checkpoint
    from embedtrain.inference import MultiVectorEncoder
    from embedtrain.kinds.multi_vector import multi_vector_settings, seed_projection
    from embedtrain.model.lora import BaseWeights, head_parameters, read_head
    from embedtrain.prompts import model_policy
    from embedtrain.train.loop import train

    out = Path(args.out).parent
    overrides = [
        "train.max_steps=2",
        "train.save_every=0",
        "logging.every=1",
        "train.lr=2e-3",  # no warm-up, a visible step for the adapter and the projection
        "optim.warmup_steps=0",
        "model.lora={r: 4, alpha: 8}",  # dropout 0.1: eval mode must switch it off for the export's parity
    ]
    config = load_config("tiny_colbert", overrides, output_dir=str(out / "run"))
    engine = train(config)
    trained = gather_adapter(engine)  # what the checkpoint holds: the adapter and the projection
    heads = [name for name, _ in head_parameters(engine.module)]
    head_numel = sum(trained[name].numel() for name in heads)
    lora_numel = sum(t.numel() for name, t in trained.items() if name not in heads)
    masters, _, _ = (int(c) for c in all_reduced(optimizer_state_numel(engine)))

    base = dict(BaseWeights(config.model.path).items())
    frozen = [(name, p) for name, p in engine.module.named_parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in frozen]):
        base_diff = max(
            float((p.detach().cpu() - base[name.removeprefix("backbone.").replace(".base_layer", "")]).abs().max())
            for name, p in frozen
        )
    initial = torch.nn.Linear(engine.module.backbone.config.hidden_size, config.model.multi_vector["dim"], bias=False)
    seed_projection(initial, config.train.seed)

    engine.eval()  # LoRA dropout off, as in the export
    tokenizer = load_tokenizer(config.model.path, config.model.padding_side)
    policy = model_policy(Path(config.train.output_dir) / "base_model")
    in_process = MultiVectorEncoder(engine, tokenizer, policy, multi_vector_settings(config))
    ours = {"queries": in_process.encode_query(QUERIES), "passages": in_process.encode_document(PASSAGES)}
    step = Path(config.train.output_dir) / "checkpoints" / "step_2"
    result = None
    if engine.global_rank == 0:
        exported = MultiVectorEncoder.from_pretrained(export_checkpoint(config.train.output_dir, out / "export"))
        theirs = {"queries": exported.encode_query(QUERIES), "passages": exported.encode_document(PASSAGES)}
        torch.save(
            {"in_process": ours, "exported": theirs, "queries": QUERIES, "passages": PASSAGES}, out / "embeddings.pt"
        )
        saved_head = read_head(step)
        result = {
            "heads": heads,
            "head_saved_equal": sorted(saved_head) == heads
            and all(torch.equal(saved_head[name], trained[name]) for name in heads),
            "head_moved": float((trained[heads[0]] - initial.weight.detach()).abs().max()) if heads else 0.0,
            "lora_b_moved": min(float(t.abs().max()) for name, t in trained.items() if ".lora_B." in name),
            "base_max_diff": base_diff,
            "frozen_count": len(frozen),
            "optimizer_master_numel": masters,
            "lora_numel": lora_numel,
            "head_numel": head_numel,
            "export": str(out / "export"),
        }
    torch.distributed.barrier()  # the export exists before the resumed run reads the run folder
    engine.destroy()

    resumed = train(load_config("tiny_colbert", overrides, output_dir=str(out / "run")))  # train.resume: auto
    again = gather_adapter(resumed)
    resumed.destroy()
    if result is not None:
        result["resumed_keys_equal"] = sorted(again) == sorted(trained)
        result["resumed_max_diff"] = max(float((again[name] - trained[name]).abs().max()) for name in trained)
    return result


def all_reduced(values):
    counts = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(counts)
    return counts.tolist()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--grad-cache", type=int, default=0, help="GradCache chunk size (queries)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (GradCache replays it)")
    parser.add_argument("--model", default=None, help="model.path (default: the tiny recipe's tiny Llama)")
    parser.add_argument("--multi-vector", action="store_true", help="the multi-vector LoRA run (module docstring)")
    args = parser.parse_args(argv)

    rank, world, _ = distributed.init_distributed()
    if args.multi_vector:
        result = multi_vector_lora(args)
        if result is not None:
            Path(args.out).write_text(json.dumps({**result, "world": world}))
        return
    global_batch = world * args.micro
    overrides = [
        f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={global_batch}",
        "deepspeed.bf16.enabled=false",
        f"deepspeed.zero_optimization.stage={args.stage}",
        f"train.grad_cache_chunk_size={args.grad_cache}",
        f"model.lora={{r: 4, alpha: 8, dropout: {args.dropout}}}",
        *([f"model.path={args.model}"] if args.model else []),
    ]
    config = load_config("tiny", overrides, output_dir=str(Path(args.out).parent / "run"))
    dataset = open_dataset(config.data, config.train.output_dir)
    collator = Collator(load_tokenizer(config.model.path), config.data, dataset.info, args.grad_cache)
    sampler = Sampler(dataset.subset_sizes(), global_batch, 0)

    def micro_batches(rank_, world_, micro_):
        stream = StepBatches(dataset, sampler, collator, rank_, world_, micro_, config.loss.hard_negatives, 0, 1)
        return [collator(examples) for examples in stream.examples(0)]

    engine = build_engine(config, deepspeed_config(config, world))
    initial = gather_adapter(engine)  # the adapter as DeepSpeed holds it, before any step
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    replay = 0.0
    for batch in micro_batches(rank, world, args.micro):
        loss, stats = micro_batch_backward(engine, batch, config.loss, 1, args.grad_cache)
        replay = max(replay, float(stats.get("grad_cache_replay_error", 0.0)))
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
    frozen_with_grad = sorted(name for name, g in grads.items() if g is not None and name not in trainable)
    engine.step()  # the optimizer step: Adam creates its moments now
    counts = torch.tensor(optimizer_state_numel(engine), dtype=torch.float64)
    torch.distributed.all_reduce(counts)
    masters, moments, moment_tensors = (int(c) for c in counts)

    config.train.activation_checkpointing = False
    reference, peft_model = reference_encoder(config)
    loss, _ = contrastive_loss(reference, micro_batches(0, 1, world * args.micro)[0], config.loss, "cpu")
    loss.backward()
    reference_params = {
        "backbone." + name.removeprefix("base_model.model."): p for name, p in peft_model.named_parameters()
    }
    errors, init_diff = {}, 0.0
    for name, _ in lora_parameters(engine.module):
        ref = reference_params[name]
        init_diff = max(init_diff, float((initial[name] - ref.detach()).abs().max()))
        errors[name] = float((grads[name] - ref.grad).norm() / ref.grad.norm().clamp(min=1e-12))
    if rank == 0:
        worst = max(errors, key=errors.get)
        lora_numel = sum(p.grad.numel() for n, p in reference_params.items() if n in errors)
        result = {
            "max_rel_error": errors[worst],
            "worst_param": worst,
            "adapter_weights": len(errors),
            "trainable": sorted(trainable) == sorted(errors),
            "frozen_with_grad": frozen_with_grad,
            "init_max_diff": init_diff,
            "replay_error": replay,
            "lora_numel": lora_numel,
            "model_numel": sum(p.numel() for p in peft_model.parameters()),
            "optimizer_master_numel": masters,
            "optimizer_moment_numel": moments,
            "optimizer_moment_tensors": moment_tensors,
            "world": world,
        }
        Path(args.out).write_text(json.dumps(result))
    engine.destroy()  # a batch's next scenario builds its own


scenario_entry = main  # what tests/workers/scenario_batch.py runs for an entry naming this worker

if __name__ == "__main__":
    scenario_batch.run(main)
    distributed.shutdown()
