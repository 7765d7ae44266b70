"""tools/bench.py's plain baselines: the same model trained on the same examples without embedtrain's
step, each side padded to its longest, queries and passages in two forwards, InfoNCE (embedtrain.losses).

    deepspeed_plain  a minimal ZeRO-3 loop: the same DeepSpeed config, torch AdamW;
    torch_plain      no DeepSpeed, one device, torch AdamW, autocast bf16 on CUDA, fp32 on the CPU.

Each run_* returns (device, batches, train_step) for bench_measure.measure_steps, which times it.
"""

import time

from bench_measure import MICRO_STEP_ENDS, subset_info, time_micro_steps


def padded_batches(spec, config, steps):
    """The plain runs' batches: each side padded to its longest, prompts as the Collator adds them."""
    from embedtrain.model.encoder import load_tokenizer
    from embedtrain.prompts import training_policy

    tokenizer = load_tokenizer(config.model.path, config.model.padding_side)
    info = subset_info()
    policy = training_policy(config.data, info)
    prompts = {name: policy.for_subset(meta) for name, meta in info.items()}

    def collate(examples):
        q = tokenizer(
            [prompts[e.subset][0] + e.query for e in examples],
            max_length=config.data.query_max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        p = tokenizer(
            [prompts[e.subset][1] + t for e in examples for t in e.passages],
            max_length=config.data.passage_max_length,
            truncation=True,
            padding=True,
            return_tensors="pt",
        )
        return {
            "query_ids": q["input_ids"],
            "query_mask": q["attention_mask"],
            "passage_ids": p["input_ids"],
            "passage_mask": p["attention_mask"],
        }

    return [[collate(micro) for micro in step] for step in steps]


def plain_checkpointing(config):
    """Whether the plain runs checkpoint every decoder layer: as embedtrain decides for the config
    (embedtrain.config.checkpoint_every, which also resolves `auto`, where it exists; any k-th-layer
    choice counts as on), else train.activation_checkpointing."""
    import embedtrain.config as config_module

    if hasattr(config_module, "checkpoint_every"):
        return bool(config_module.checkpoint_every(config, config_module.deepspeed_config(config, 1)))
    return bool(config.train.activation_checkpointing)


def plain_model(config, dtype):
    """The model both plain runs train: load_backbone + Encoder, as embedtrain builds it, every
    decoder layer checkpointed when embedtrain would (plain_checkpointing)."""
    from embedtrain.model import Encoder, load_backbone

    backbone = load_backbone(
        config.model.path,
        dtype=dtype,
        attn_implementation=config.model.attn_implementation,
        pooling=config.model.pooling,
    )
    if plain_checkpointing(config):
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Encoder(backbone, config.model.pooling, config.model.normalize)


def adamw(model, config, **options):
    """torch AdamW with train.lr and the optim.* settings; options: e.g. fused."""
    import torch

    return torch.optim.AdamW(
        model.parameters(),
        lr=config.train.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        **options,
    )


def run_deepspeed_plain(spec, config, steps, counter):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from embedtrain import distributed
    from embedtrain.config import deepspeed_config, precision_dtype
    from embedtrain.losses import group_info_nce

    distributed.init_distributed()  # embedtrain's: also skips DeepSpeed's CPU shared-memory op build
    counter.install()
    ds_config = deepspeed_config(config, 1)
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - ZeRO-3 partitions while loading, while alive
    model = plain_model(config, precision_dtype(ds_config))
    optimizer = adamw(model, config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()
    time_micro_steps(engine)
    batches = padded_batches(spec, config, steps)
    device, temperature = engine.device, config.loss.temperature

    def train_step(micro_batches):
        total = 0.0
        for batch in micro_batches:
            queries = engine(batch["query_ids"].to(device), batch["query_mask"].to(device))
            passages = engine(batch["passage_ids"].to(device), batch["passage_mask"].to(device))
            loss = group_info_nce(queries, passages, temperature)[0]
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        return float(total)

    return device, batches, train_step


def run_torch_plain(spec, config, steps, counter):
    import contextlib

    import torch

    from embedtrain.losses import group_info_nce

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = plain_model(config, torch.float32).to(device).train()
    optimizer = adamw(model, config, fused=device.type == "cuda")
    batches = padded_batches(spec, config, steps)
    temperature = config.loss.temperature
    clip = 1.0  # ds_configs' gradient_clipping, for the same optimizer step

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(micro_batches):
        total = 0.0
        for index, batch in enumerate(micro_batches):
            with autocast():
                queries = model(batch["query_ids"].to(device), batch["query_mask"].to(device))
                passages = model(batch["passage_ids"].to(device), batch["passage_mask"].to(device))
            loss = group_info_nce(queries, passages, temperature)[0]
            (loss / len(micro_batches)).backward()
            total += loss.detach()
            if index < len(micro_batches) - 1:  # the last micro-step ends after the optimizer step
                MICRO_STEP_ENDS.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        MICRO_STEP_ENDS.append(time.perf_counter())
        return float(total)

    return device, batches, train_step
