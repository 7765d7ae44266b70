"""`deepspeed.config: auto` and `train.activation_checkpointing: auto`: the cheapest ZeRO stage and
the least recompute whose memory fits the card, from the memory model `embedtrain plan` prints.

Why this order. ZeRO-3 hooks every submodule (about 13 per decoder layer) in forward, recompute
and backward, and gathers the weights twice per micro-step; ZeRO-2 gathers them once per optimizer
step. A CPU probe of the 1B layout (16 decoder layers at a tiny width, host time per micro-step)
measured plain PyTorch about 100 ms, ZeRO-2 about 145 ms, ZeRO-3 about 400 ms, and ZeRO-3 with the
decoder layers registered as leaf modules (`deepspeed.utils.set_z3_leaf_modules`: one hook per
layer) about 245 ms (issue 26). Recompute costs a third more FLOPs per checkpointed layer. So:
  1. ZeRO-2 when its model states plus the activations fit, with the fewest checkpointed layers
     that fit (none, then every k-th layer for k = L, L-1, ..., then all of them);
  2. else ZeRO-3 with the decoder layers as leaf modules, the same ladder of recompute, and across
     nodes ZeRO++ hierarchical partitioning (zero_hpz_partition_size = GPUs per node: a second
     bf16 copy of the weights partitioned within the node, so the all-gathers of forward and
     backward stay on NVLink; arXiv:2306.10209) when that copy fits with any recompute: across
     nodes (InfiniBand, ~1/9 of NVLink's bandwidth) the gathers cost a ZeRO-3 step more than
     recomputing layers does;
  3. else ZeRO-3 with full recompute, reported as not fitting (offload: ds_configs/zero3_offload.json).

Memory per GPU (bytes), as in plan.py's docstring, by stage:
  ZeRO-1/2   2 P + 18 P / N (DeepSpeed's estimate_zero2_model_states_mem_needs: bf16 weights on
             every rank; bf16 and fp32 gradients, fp32 master and Adam m, v partitioned);
  ZeRO-3     18 P / N + 4 x the largest layer (two gathered layers in bf16), + 2 P / G with hpZ;
  LoRA       the frozen base costs only its bf16 weights (2 bytes, partitioned under ZeRO-3);
  activations per token and layer 34 h bytes kept, 2 h for a checkpointed layer (its input) plus
             one layer's 34 h while it is recomputed (Korthikanti et al. 2022); plus fp32 final
             states and their gradient (8 h per token) for pooling;
  reserve    2 GiB (CUDA context, NCCL) + 10 % fragmentation; the total must stay within 90 % of
             the card's memory (allocator peaks).
Tokens per micro-step: train.micro_batch_tokens when set, else the micro-batch's (or GradCache
chunk's) queries x (query max length + (1 + hard negatives) x passage max length), as plan counts.
"""

import math
import os
from dataclasses import asdict, dataclass

GIB = 2**30
FIT_FRACTION = 0.9  # of the card's memory: headroom for allocator peaks
RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL buffers
FRAGMENTATION = 0.1


@dataclass(frozen=True)
class Hardware:
    """Where a run trains: `card_bytes` of memory per GPU (`card_source` says where that number came from)."""

    nodes: int
    gpus_per_node: int
    card_bytes: float
    card_source: str = ""

    @property
    def world(self):
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Decision:
    """What auto chose: ZeRO stage, decoder layers as ZeRO-3 leaf modules, zero_hpz_partition_size
    (1 = off), activation checkpointing every k-th layer (0 = off, 1 = every layer), the memory
    per GPU it predicts, whether that fits, and why."""

    stage: int
    leaf_modules: bool
    hpz: int
    checkpoint_every: int
    memory_bytes: float
    fits: bool
    reason: str

    def record(self):
        return asdict(self)


def checkpointed_layers(layers, every):
    """Layers 0, k, 2k, ... are checkpointed: ceil(L / k) of them (0 when off)."""
    return 0 if not every else math.ceil(layers / every)


def ordinal(number):
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def describe_checkpointing(every, layers=None):
    """'activation checkpointing off / on every layer / on every 3rd layer (11 of 32)'."""
    if not every:
        return "activation checkpointing off"
    count = f" ({checkpointed_layers(layers, every)} of {layers})" if layers else ""
    if every == 1:
        return "activation checkpointing on every layer" + (f" ({layers})" if layers else "")
    return f"activation checkpointing on every {ordinal(every)} layer{count}"


def activation_bytes(shape, tokens, checkpointed):
    """Activations held for `tokens` tokens with `checkpointed` of the layers checkpointed."""
    h, layers = shape.hidden_size, shape.num_hidden_layers
    kept = checkpointed * 2 * tokens * h + (layers - checkpointed) * 34 * tokens * h
    recomputed = 34 * tokens * h if checkpointed else 0
    return kept + recomputed + tokens * h * 4 * 2  # fp32 final states for pooling and their gradient


def model_state_bytes(shape, gpus, stage, lora_params=0, offload="none", hpz=1):
    """Weights, gradients and optimizer states per GPU (module docstring)."""
    trained = lora_params or shape.params
    frozen = shape.params if lora_params else 0
    if stage == 3:
        states = {
            "none": (2 * frozen + 18 * trained) / gpus,
            "optimizer": 2 * (frozen + trained) / gpus,
            "optimizer+params": 0.0,
        }[offload]
        if hpz > 1:
            states += 2 * (frozen + trained) / hpz
        return states
    if offload != "none":  # ZeRO-Offload: the optimizer and its fp32 states on the host, bf16 weights here
        return 2 * (frozen + trained)
    return 2 * (frozen + trained) + 18 * trained / gpus


def with_reserve(parts):
    parts["reserve"] = RESERVE_BYTES + FRAGMENTATION * sum(parts.values())
    return parts


def memory_parts(shape, gpus, stage, tokens, checkpointed, lora_params=0, hpz=1, pool_bytes=0.0):
    """Bytes per GPU by component for one ZeRO stage and recompute choice."""
    parts = {"model states": model_state_bytes(shape, gpus, stage, lora_params, hpz=hpz)}
    if stage == 3:
        parts["gathered layers"] = 4 * shape.largest_layer_params
    parts["activations"] = activation_bytes(shape, tokens, checkpointed)
    if pool_bytes:
        parts["embedding pool"] = pool_bytes
    return with_reserve(parts)


def checkpointing_ladder(layers):
    """Every distinct recompute choice, least recompute first: 0 (off), then each number of
    checkpointed layers ceil(L / k) with the smallest k that gives it (evenly spread layers)."""
    smallest = {}
    for every in range(1, layers + 1):
        smallest.setdefault(checkpointed_layers(layers, every), every)
    return [0] + [smallest[count] for count in sorted(smallest)]


def decide(shape, hardware, tokens, lora_params=0, stage=None, checkpoint_every=None, pool_bytes=0.0):
    """The auto choice for `shape` trained on `hardware` with `tokens` tokens per micro-step.
    `stage` / `checkpoint_every` fix that part (a recipe override, or train.activation_checkpointing
    set explicitly); None leaves it to the rule of the module docstring. Pure: no torch, no I/O."""
    gpus, per_node, layers = hardware.world, hardware.gpus_per_node, shape.num_hidden_layers
    limit = FIT_FRACTION * hardware.card_bytes
    stages = [stage] if stage is not None else [2, 3]
    ladder = [checkpoint_every] if checkpoint_every is not None else checkpointing_ladder(layers)
    tried = []
    for candidate in stages:
        hpz_options = [per_node, 1] if candidate == 3 and hardware.nodes > 1 and per_node > 1 else [1]
        for hpz in hpz_options:  # hpZ first: across nodes the gathers dominate a ZeRO-3 step more than recompute
            for every in ladder:
                parts = memory_parts(
                    shape, gpus, candidate, tokens, checkpointed_layers(layers, every), lora_params, hpz, pool_bytes
                )
                total = sum(parts.values())
                tried.append((candidate, every, hpz, total))
                if total <= limit:
                    why = _reason(shape, hardware, tokens, candidate, every, hpz, parts, tried, stage, lora_params)
                    return Decision(candidate, candidate == 3, hpz, every, total, True, why)
    candidate, every = stages[-1], ladder[-1]
    parts = memory_parts(shape, gpus, candidate, tokens, checkpointed_layers(layers, every), lora_params, 1, pool_bytes)
    total = sum(parts.values())
    reason = (
        f"nothing fits: ZeRO-{candidate} with {describe_checkpointing(every, layers)} needs {total / GIB:.1f} GiB per "
        f"GPU, more than {FIT_FRACTION:.0%} of {hardware.card_bytes / GIB:.0f} GiB ({hardware.card_source}); use more "
        "GPUs, fewer tokens per micro-step (train.micro_batch_tokens or train.micro_batch_size), or "
        "deepspeed.config=zero3_offload.json"
    )
    return Decision(candidate, candidate == 3, 1, every, total, False, reason)


def _reason(shape, hardware, tokens, stage, every, hpz, parts, tried, forced_stage, lora_params):
    layers, gpus = shape.num_hidden_layers, hardware.world
    split = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
    head = (
        f"ZeRO-{stage}"
        + (" (decoder layers as leaf modules)" if stage == 3 else "")
        + (f" + ZeRO++ hpZ over {hpz} GPUs per node" if hpz > 1 else "")
        + f", {describe_checkpointing(every, layers)}: {sum(parts.values()) / GIB:.1f} GiB per GPU ({split}) at "
        f"{tokens:,} tokens per micro-step fits {FIT_FRACTION:.0%} of {hardware.card_bytes / GIB:.0f} GiB "
        f"({hardware.card_source}), {gpus} GPU(s)"
    )
    if forced_stage is not None:
        return head + f"; ZeRO stage {forced_stage} set by the recipe"
    if stage == 3:
        smallest = min(total for s, _, _, total in tried if s == 2)
        states = model_state_bytes(shape, gpus, 2, lora_params)
        return head + (
            f"; ZeRO-2 does not fit (model states alone {states / GIB:.1f} GiB, at least "
            f"{smallest / GIB:.1f} GiB in all)"
        )
    return head + "; ZeRO-3 not needed (ZeRO-2 gathers the weights once per step, not twice per micro-step)"


def local_world_size(world):
    """Ranks on this node, from the launcher's environment (torchrun: LOCAL_WORLD_SIZE; the
    deepspeed launcher: LOCAL_SIZE); without either, every rank is on one node."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key):
            return max(1, min(world, int(os.environ[key])))
    return world


def detect_hardware(world):
    """This run's hardware. CUDA: the current device's total memory. CPU (tests, the tiny recipes):
    the host's physical memory shared by the node's ranks, the memory the run would exhaust."""
    import torch

    per_node = local_world_size(world)
    nodes = max(1, world // per_node)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return Hardware(nodes, per_node, float(props.total_memory), f"{props.name}, torch.cuda")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(nodes, per_node, host / per_node, f"CPU: host memory / {per_node} local rank(s)")


def auto_deepspeed_json(decision, shape=None):
    """The DeepSpeed JSON of a decision: bf16 and clipping 1.0 as ds_configs/*.json, and the chosen
    ZeRO section (fp32 gradient accumulation is added to every bf16 ZeRO JSON, this one included, by
    config.set_grad_accum_dtype).
    Buckets hold two decoder layers of `shape` (one computing, the next in flight), at least 50M
    parameters as in ds_configs/."""
    bucket = max(50000000, 2 * shape.layer_params) if shape is not None else 50000000
    zero = {"stage": decision.stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": bucket}
    if decision.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket,
            stage3_param_persistence_threshold=100000,
            stage3_max_live_parameters=1000000000,
            stage3_max_reuse_distance=1000000000,
            stage3_gather_16bit_weights_on_model_save=False,
        )
        if decision.hpz > 1:
            zero["zero_hpz_partition_size"] = decision.hpz
    else:
        zero["allgather_bucket_size"] = bucket
    bf16 = {"enabled": True}
    if decision.stage < 3:
        bf16["check_grad_overflow"] = True  # ZeRO-1/2 skip a non-finite step only with it (config.py)
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "bf16": bf16,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "steps_per_print": 1000000000,
        "wall_clock_breakdown": False,
    }
