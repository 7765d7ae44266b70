"""`embedtrain plan`: per-GPU memory and step time of a recipe on a cluster, before any GPU spins.

Memory per GPU under ZeRO-3 with bf16 (bytes):
  model states   18 P / N  (bf16 params 2, fp32 grads 4, fp32 master 4, Adam m and v 8), or
                 2 P / N with the optimizer offloaded, 0 with parameters offloaded too;
  working set    4 x largest layer (the gathered layer plus the prefetched one, bf16);
  activations    per token and layer ~ 34 h bytes without checkpointing (Korthikanti et al. 2022,
                 with SDPA/flash attention so no s^2 term); with checkpointing 2 h per token and
                 layer are kept and one layer is recomputed at a time; tokens = every query and
                 passage at its side's max length, so memory grows linearly with length;
  attention      eager attention only: bf16 scores and probabilities, heads x L^2 x 4 bytes per
                 sequence and layer (one layer with checkpointing);
  GradCache      with train.grad_cache_chunk_size C < micro, activations are those of C queries
                 and the step does one more forward (x 5/4 with checkpointing, x 4/3 without);
  gather buffers the global pool: W x B x G x D fp32 embeddings, forward and gradient;
  reserve        2 GiB (CUDA context, NCCL) and 10 % fragmentation.
An option fits when its total is at most 90 % of the GPU's memory (headroom for allocator peaks).
Step time = model FLOPs of the step (6 x non-embedding params + 12 x layers x hidden x L per
token; x 4/3 with checkpointing for the recomputed forward) / (GPUs x peak x MFU).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
SHAPES = {  # public architecture facts of the recipes' base models
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
}
RECIPE_SHAPES = {"llama3_2_1b": "llama-3.2-1b", "llama_embed_nemotron_8b": "llama-3.1-8b"}


@dataclass
class Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def layer_params(self):
        h, kv = self.hidden_size, self.hidden_size // self.num_attention_heads * self.num_key_value_heads
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h

    @property
    def non_embedding_params(self):
        return self.num_hidden_layers * self.layer_params + self.hidden_size

    @property
    def params(self):
        return self.non_embedding_params + self.vocab_size * self.hidden_size

    @property
    def largest_layer_params(self):
        return max(self.layer_params, self.vocab_size * self.hidden_size)

    def flops_per_token(self, length):
        return 6 * self.non_embedding_params + 12 * self.num_hidden_layers * self.hidden_size * length


def shape_for(config, recipe_name, shape_name=None):
    if shape_name:
        return Shape(**SHAPES[shape_name])
    config_file = Path(config.model.path) / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        return Shape(**{k: raw[k] if raw.get(k) is not None else raw["num_attention_heads"] for k in SHAPES["llama-3.1-8b"]})
    if recipe_name in RECIPE_SHAPES:
        return Shape(**SHAPES[RECIPE_SHAPES[recipe_name]])
    raise ValueError("no model shape: set model.path to a checkpoint folder or pass --shape "
                     f"({', '.join(SHAPES)})")


def attention_score_bytes(shape, queries, lengths):
    """Eager attention's materialised scores + probabilities (bf16) for one layer: `lengths` are
    the sequence lengths of one query's group (query, then passages)."""
    return queries * shape.num_attention_heads * sum(length * length for length in lengths) * 4


def memory_per_gpu(shape, gpus, micro, tokens_per_query, passages_per_query, checkpointing, offload, global_pool,
                   activation_queries=None, score_bytes_per_layer=0.0):
    """Bytes per GPU by component, for micro-batch `micro` queries per GPU; activations are held
    for `activation_queries` of them at a time (GradCache chunks; default all)."""
    states = {"none": 18 * shape.params / gpus, "optimizer": 2 * shape.params / gpus, "optimizer+params": 0.0}[offload]
    tokens = (activation_queries or micro) * tokens_per_query
    h, layers = shape.hidden_size, shape.num_hidden_layers
    if checkpointing:
        activations = layers * 2 * tokens * h + 34 * tokens * h
    else:
        activations = layers * 34 * tokens * h
    activations += tokens * h * 4 * 2  # fp32 final states for pooling and their gradient
    pool = gpus * micro * passages_per_query * h * 4 * 2 if global_pool else micro * passages_per_query * h * 8
    parts = {"model states": states, "gathered layers": 4 * shape.largest_layer_params, "activations": activations,
             "embedding pool": pool}
    if score_bytes_per_layer:
        parts["attention scores"] = score_bytes_per_layer * (1 if checkpointing else layers)
    parts["reserve"] = 2 * GIB + 0.1 * sum(parts.values())
    return parts


def plan(config, recipe_name, nodes, gpus_per_node, gpu_memory_gib=80.0, mfu=0.40, peak_tflops=989.0, shape_name=None):
    """Options (micro-batch x checkpointing x offload) with memory and step time; the best that fits."""
    shape = shape_for(config, recipe_name, shape_name)
    gpus = nodes * gpus_per_node
    group = 1 + config.loss.hard_negatives
    lq, lp = config.data.query_max_length, config.data.passage_max_length
    tokens_per_query = lq + group * lp
    global_batch = config.train.global_batch_size
    step_flops = global_batch * (shape.flops_per_token(lq) * lq + group * shape.flops_per_token(lp) * lp)
    chunk = config.train.grad_cache_chunk_size
    eager = config.model.attn_implementation == "eager"
    options = []
    for offload in ("none", "optimizer", "optimizer+params"):
        for checkpointing in (False, True):
            micro = 1
            while micro * gpus <= global_batch and global_batch % (micro * gpus) == 0:
                held = chunk if chunk and chunk < micro and micro % chunk == 0 else micro
                scores = attention_score_bytes(shape, held, [lq] + [lp] * group) if eager else 0.0
                parts = memory_per_gpu(shape, gpus, micro, tokens_per_query, group, checkpointing, offload,
                                       config.loss.negatives == "global", held, scores)
                recompute = 4 / 3 if checkpointing else 1
                if held < micro:  # GradCache: one more forward
                    recompute = 5 / 3 if checkpointing else 4 / 3
                seconds = step_flops * recompute / (gpus * peak_tflops * 1e12 * mfu)
                seconds *= {"none": 1.0, "optimizer": 1.15, "optimizer+params": 1.6}[offload]  # stated guesses
                options.append({"micro_batch": micro, "accumulation": global_batch // (micro * gpus), "held": held,
                                "checkpointing": checkpointing, "offload": offload,
                                "memory_gib": sum(parts.values()) / GIB,
                                "parts_gib": {k: v / GIB for k, v in parts.items()}, "step_seconds": seconds,
                                "fits": sum(parts.values()) <= 0.9 * gpu_memory_gib * GIB})
                micro *= 2
    fitting = [o for o in options if o["fits"]]
    best = min(fitting, key=lambda o: (o["step_seconds"], -o["micro_batch"])) if fitting else None
    return {"shape": shape, "gpus": gpus, "params": shape.params, "tokens_per_step": global_batch * tokens_per_query,
            "lengths": (lq, lp), "attention": config.model.attn_implementation, "grad_cache_chunk": chunk,
            "options": options, "best": best, "mfu": mfu, "gpu_memory_gib": gpu_memory_gib}


def format_plan(result):
    shape, best = result["shape"], result["best"]
    lines = [f"model: {result['params'] / 1e9:.2f}B parameters ({shape.num_hidden_layers} layers, hidden "
             f"{shape.hidden_size}); {result['gpus']} GPU(s) of {result['gpu_memory_gib']:.0f} GiB; "
             f"{result['tokens_per_step']:,} padded tokens per step (query {result['lengths'][0]}, passages "
             f"{result['lengths'][1]} tokens, {result['attention']} attention"
             + (f", GradCache chunks of {result['grad_cache_chunk']}" if result["grad_cache_chunk"] else "")
             + f"); step time at {result['mfu']:.0%} MFU",
             f"{'micro':>5} {'accum':>5} {'ckpt':>5} {'offload':>16} {'GiB/GPU':>8} {'s/step':>7}  fits"]
    for o in result["options"]:
        lines.append(f"{o['micro_batch']:>5} {o['accumulation']:>5} {str(o['checkpointing']):>5} {o['offload']:>16} "
                     f"{o['memory_gib']:>8.1f} {o['step_seconds']:>7.2f}  {'yes' if o['fits'] else 'no'}")
    if best is None:
        lines.append("recommendation: nothing fits; use more GPUs, shorter sequences or fewer hard negatives")
    else:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in best["parts_gib"].items())
        lines.append(f"recommendation: micro-batch {best['micro_batch']} x accumulation {best['accumulation']}, "
                     f"activation checkpointing {'on' if best['checkpointing'] else 'off'}, offload "
                     f"{best['offload']}: {best['memory_gib']:.1f} GiB per GPU ({parts}), "
                     f"{best['step_seconds']:.2f} s per step")
    return "\n".join(lines)
