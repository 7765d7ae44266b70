"""`embedtrain plan`: per-GPU memory and step time of a recipe on a cluster, before any GPU spins.

Memory per GPU under ZeRO-3 with bf16 (bytes):
  model states   18 P / N  (bf16 params 2, fp32 grads 4, fp32 master 4, Adam m and v 8), or
                 2 P / N with the optimizer offloaded, 0 with parameters offloaded too;
  working set    4 x largest layer (the gathered layer plus the prefetched one, bf16);
  ZeRO-1/2       (the run's stage: its JSON, or what deepspeed.config=auto chooses, embedtrain.autoconfig)
                 model states 2 P + 18 P / N (DeepSpeed's estimate_zero2_model_states_mem_needs: bf16
                 weights on every GPU), no gathered layers;
  activations    per token and layer ~ 34 h bytes without checkpointing (Korthikanti et al. 2022,
                 with SDPA/flash attention so no s^2 term); with checkpointing 2 h per token and
                 layer are kept and one layer is recomputed at a time; tokens = every query and
                 passage at its side's max length, so memory grows linearly with length;
  attention      eager attention only: bf16 scores and probabilities, heads x L^2 x 4 bytes per
                 sequence and layer (one layer with checkpointing);
  GradCache      with train.grad_cache_chunk_size C < micro, activations are those of C queries
                 and the step does one more forward (x 5/4 with checkpointing, x 4/3 without);
  gather buffers the global pool: W x B x G x D fp32 embeddings, forward and gradient;
  multi-vector  (model.kind=multi_vector, ColBERT) token embeddings instead of the pool's: every query
                and passage of the micro-batch at the micro-batch's token width (the larger max length:
                the loss pads both sides to one width) x dim fp32, and their gradient (GradCache's cache
                is the same set); under global the gathered pool, W x B x G x passage tokens x dim x 4,
                and its gradient; the MaxSim scores: one block of losses.MAXSIM_BLOCK_ELEMENTS fp32
                similarities plus, for the backward, an int64 best-token index per (query token, pool
                passage);
  sparse        (model.kind=sparse, SPLADE) the LM head's vocabulary logits of every token of a
                forward (GradCache: a chunk's), 2 x tokens x vocab x bytes (the logits, which the
                max over tokens keeps for its backward, and their gradient; bf16: 2 bytes): for a
                128k vocabulary the largest activation by far (Llama 3.2 1B: 0.5 MB per token,
                against 34 h = 70 kB per layer). The (B, V) fp32 term-weight vectors of the
                micro-batch's queries and passages, and their gradient, replace the D-wide embeddings
                of the pool (x W under global, queries included: FLOPS gathers them); an untied LM
                head adds its model states; its matmul adds 6 h V FLOPs per token;
  reserve        2 GiB (CUDA context, NCCL) and 10 % fragmentation.
  LoRA          (model.lora) the base is frozen: 2 P / N for its bf16 weights plus 18 P_lora / N for
                 the adapter (its gradients, fp32 master and Adam moments are the only ones there are).
An option fits when its total is at most 90 % of the GPU's memory (headroom for allocator peaks).
Step time = compute + communication, added, not overlapped (DeepSpeed prefetches and overlaps
part of it, so this is an upper bound):
  compute        model FLOPs of the step (6 x non-embedding params + 12 x layers x A x L per token,
                 A = attention heads x head_dim: the hidden size for Llama, 2 x hidden for Qwen3-0.6B;
                 x 4/3 with checkpointing for the recomputed forward) / (GPUs x peak x MFU);
                 with LoRA 4 x params + 6 x adapter params + the same attention term (no weight
                 gradients for the frozen base), and a recomputed forward adds half of that;
  communication  per GPU and optimizer step, under ZeRO-3 with A accumulation micro-steps and
                 ONE encoder forward per micro-batch (queries and passages together):
                   all-gathered    A x 2 x P x b_param  (bf16 parameters gathered for the forward and
                                   again for the backward/recompute; GradCache with c chunks: A x c x 3,
                                   its no-grad forward gathers once more),
                   reduce-scattered A x P x b_grad     (gradients once per micro-step, x c with GradCache;
                                   b_grad 4 with communication_data_type fp32, else 2; with LoRA the
                                   adapter's P_lora only, while the frozen base is still gathered),
                 each moved in a ring: (N - 1) / N of it crosses one GPU's link, so
                   seconds = (gathered + reduce-scattered) x (N - 1) / N / bandwidth per GPU.
                 ZeRO-1/2: parameters all-gathered once per step, gradients reduce-scattered once per
                 micro-step (ZeRO-2) or per step (ZeRO-1). One GPU communicates nothing.
                 Default bandwidth (per GPU, each direction): within one node 3,600 Gb/s = 450 GB/s,
                 half of the H100 SXM's 900 GB/s NVLink 4 figure, which counts both directions
                 (NVIDIA H100 datasheet); across nodes 400 Gb/s, one ConnectX-7 NDR InfiniBand port per
                 GPU (NVIDIA DGX H100 datasheet: 8 x 400 Gb/s for 8 GPUs). Persistent small parameters
                 (below stage3_param_persistence_threshold) are counted too: a small overestimate.
                 The backward's gather is shared with the recompute when a layer is smaller than
                 stage3_max_reuse_distance (1e9 parameters in ds_configs); a whole model below it
                 keeps its parameters from forward to backward and gathers about once per micro-step
                 (tools/bench.py counts the fetches: the tiny model 1 x P per micro-step; with
                 stage3_max_reuse_distance=0, 2.5 x P: its layers for forward, recompute and backward).
"""

import json
from pathlib import Path

import yaml

from embedtrain.autoconfig import GIB, Hardware, activation_bytes, auto_deepspeed_json, model_state_bytes, with_reserve
from embedtrain.config import load_config, recipe_path
from embedtrain.losses import MAXSIM_BLOCK_ELEMENTS
from embedtrain.shape import Shape

NVLINK_GBPS = 3600.0  # H100 SXM NVLink 4: 900 GB/s both directions -> 450 GB/s = 3,600 Gb/s each way
INTER_NODE_GBPS = 400.0  # one ConnectX-7 NDR InfiniBand port (400 Gb/s) per GPU, as in a DGX H100
SHAPES = {  # public architecture facts of the recipes' base models (docs/recipes.md)
    # config.json of https://huggingface.co/meta-llama/Llama-3.2-1B (head_dim 64 = 2048 / 32)
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    # config.json of https://huggingface.co/meta-llama/Llama-3.1-8B (head_dim 128 = 4096 / 32)
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    # Qwen/Qwen3-0.6B: model card https://huggingface.co/Qwen/Qwen3-0.6B (28 layers, 16 query / 8 KV
    # heads, 0.6B parameters of which 0.44B non-embedding) and its config.json (hidden 1024,
    # intermediate 3072, head_dim 128, vocabulary 151936, tie_word_embeddings true; read from copies of
    # that file, which the card's 0.44B non-embedding count confirms: tests/test_plan.py); every Qwen3
    # layer has an RMSNorm of head_dim on queries and one on keys (transformers' Qwen3Attention)
    "qwen3-0.6b": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        qk_norm=True,
        tie_word_embeddings=True,
    ),
    # Ministral 3 3B (mistralai/Ministral-3-3B-Base-2512 and -Instruct-2512, a Mistral3 vision-language
    # checkpoint whose text_config is model_type ministral3): "Ministral 3", arXiv:2601.08584 (26 layers,
    # hidden 3072, FFN 9216, 32 query / 8 KV heads, 131K vocabulary, tied input/output embeddings in the
    # 3B); head_dim 128 and vocab_size 131072 from the checkpoint's config.json text_config (read from a
    # re-upload of the Instruct checkpoint; mistralai's own page was not reachable) and transformers'
    # Ministral3Config defaults; the model card https://huggingface.co/mistralai/Ministral-3-3B-Base-2512
    # says "3.4B Language Model" + "0.4B Vision Encoder", which the count here matches (with head_dim
    # 3072 / 32 = 96 it would be 3.2B). The vision encoder is not part of the text encoder trained here.
    "ministral3-3b": dict(
        vocab_size=131072,
        hidden_size=3072,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
}
RECIPE_SHAPES = {
    "llama3_2_1b": "llama-3.2-1b",
    "llama3_2_1b_sparse": "llama-3.2-1b",
    "llama3_2_1b_colbert": "llama-3.2-1b",
    "llama_embed_nemotron_8b": "llama-3.1-8b",
    "ministral3_3b": "ministral3-3b",
    "qwen3_0_6b": "qwen3-0.6b",
}


def shape_for(config, recipe_name, shape_name=None):
    if shape_name:
        return Shape(**SHAPES[shape_name])
    config_file = Path(config.model.path) / "config.json"
    if config_file.is_file():
        try:
            return Shape.from_config(json.loads(config_file.read_text()))
        except ValueError as err:
            raise ValueError(f"model.path: {config_file}: {err}") from err
    if recipe_name in RECIPE_SHAPES:
        return Shape(**SHAPES[RECIPE_SHAPES[recipe_name]])
    raise ValueError(f"no model shape: set model.path to a checkpoint folder or pass --shape ({', '.join(SHAPES)})")


def attention_score_bytes(shape, queries, lengths):
    """Eager attention's materialised scores + probabilities (bf16) for one layer: `lengths` are
    the sequence lengths of one query's group (query, then passages)."""
    return queries * shape.num_attention_heads * sum(length * length for length in lengths) * 4


def memory_per_gpu(
    shape,
    gpus,
    micro,
    tokens_per_query,
    passages_per_query,
    checkpointing,
    offload,
    global_pool,
    activation_queries=None,
    score_bytes_per_layer=0.0,
    lora_params=0,
    stage=3,
    sparse_logit_bytes=0,
    token_embeddings=None,
):
    """Bytes per GPU by component, for micro-batch `micro` queries per GPU; activations are held
    for `activation_queries` of them at a time (GradCache chunks; default all). With `lora_params`
    adapter parameters the base is frozen: its bf16 weights (2 bytes) have no gradient, master copy
    or Adam moments; the adapter has all of them (18 bytes). `sparse_logit_bytes`: a sparse model's
    bytes per vocabulary logit (0: not a sparse model; module docstring). `token_embeddings`: a
    multi-vector model's (token width of a micro-batch, passage tokens, dim) (multi_vector_bytes)."""
    states = model_state_bytes(shape, gpus, stage, lora_params, offload)
    tokens = (activation_queries or micro) * tokens_per_query
    h, layers = shape.hidden_size, shape.num_hidden_layers
    activations = activation_bytes(shape, tokens, layers if checkpointing else 0)
    width, rows = (shape.vocab_size, passages_per_query + 1) if sparse_logit_bytes else (h, passages_per_query)
    pool = gpus * micro * rows * width * 4 * 2 if global_pool else micro * rows * width * 8
    parts = {
        "model states": states,
        "gathered layers": 4 * shape.largest_layer_params if stage == 3 else 0.0,
        "activations": activations,
        "embedding pool": pool,
    }
    if sparse_logit_bytes:
        parts["vocabulary logits"] = sparse_logit_bytes * 2 * tokens * shape.vocab_size
        if not shape.tie_word_embeddings:  # the LM head is trained too: states in proportion to its size
            parts["model states"] += states * shape.vocab_size * h / shape.params
    if score_bytes_per_layer:
        parts["attention scores"] = score_bytes_per_layer * (1 if checkpointing else layers)
    if token_embeddings:
        parts.update(multi_vector_bytes(gpus, micro, passages_per_query, global_pool, *token_embeddings))
    return with_reserve(parts)


def multi_vector_bytes(gpus, micro, passages_per_query, global_pool, width, passage_tokens, dim):
    """A multi-vector model's token-embedding memory (module docstring) in place of the embedding
    pool: the micro-batch's (1 + G) sequences per query at `width` tokens (the loss pads the queries
    and passages of a micro-batch to one width) x dim fp32, and their gradient (the GradCache cache
    holds the same); under `global` the gathered pool of every rank's passages at `passage_tokens`
    and its gradient; the MaxSim similarities of one block (losses.MAXSIM_BLOCK_ELEMENTS fp32) and,
    for the backward, the best document token of every (query token, pool passage) pair (int64)."""
    local = micro * (1 + passages_per_query) * width * dim * 4 * 2
    pool_passages = (gpus if global_pool else 1) * micro * passages_per_query
    gathered = pool_passages * passage_tokens * dim * 4 * 2 if global_pool else 0
    scores = MAXSIM_BLOCK_ELEMENTS * 4 + micro * width * pool_passages * 8
    return {"embedding pool": local + gathered, "MaxSim scores": scores}


def default_bandwidth_gbps(nodes):
    """Per-GPU bandwidth (Gb/s, each direction) the plan assumes: NVLink in one node, InfiniBand across."""
    return NVLINK_GBPS if nodes == 1 else INTER_NODE_GBPS


def communication_dtypes(config, decision=None):
    """(ZeRO stage, bytes per gathered parameter, bytes per reduced gradient element) from the run's
    DeepSpeed JSON (deepspeed.config=auto: the JSON of `decision`) and its recipe overrides. Read
    here rather than through config.deepspeed_config, which needs the recipe's micro-batch to divide
    the global batch on this cluster and DeepSpeed."""
    from embedtrain.config import AUTO, deepspeed_config_path

    name = config.deepspeed.get("config", "zero3.json")
    ds = auto_deepspeed_json(decision) if name == AUTO else json.loads(deepspeed_config_path(name).read_text())
    overrides = {k: v for k, v in config.deepspeed.items() if k != "config"}
    for key in ("bf16", "fp16", "zero_optimization"):
        if isinstance(overrides.get(key), dict):
            ds[key] = {**ds.get(key, {}), **overrides.pop(key)}
    ds.update(overrides)
    half = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    param_bytes = 2 if half else 4
    # DeepSpeed reduces gradients in communication_data_type when set, else in the parameters' dtype
    grad_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(ds.get("communication_data_type"), param_bytes)
    return ds.get("zero_optimization", {}).get("stage", 0), param_bytes, grad_bytes


def communication_bytes(params, accumulation, chunks=1, param_bytes=2, grad_bytes=2, stage=3, trained=None):
    """(all-gathered, reduce-scattered) bytes per GPU per optimizer step, full tensor sizes (see the
    module docstring): ONE encoder forward per micro-batch, `chunks` GradCache chunks per micro-batch
    (1 = no GradCache). `trained`: the parameters with gradients (LoRA: the adapter; default all):
    only they are reduced, and under ZeRO-1/2 only they are all-gathered after the step; ZeRO-3
    gathers the frozen base for every forward all the same."""
    trained = params if trained is None else trained
    micro_steps = accumulation * chunks
    if stage == 3:
        forwards = 3 if chunks > 1 else 2  # forward + backward/recompute; GradCache's no-grad pass
        return micro_steps * forwards * params * param_bytes, micro_steps * trained * grad_bytes
    reductions = micro_steps if stage == 2 else 1
    return trained * param_bytes, reductions * trained * grad_bytes


def communication_seconds(total_bytes, gpus, bandwidth_gbps):
    """Ring collectives: (N - 1) / N of the bytes cross each GPU's link, at `bandwidth_gbps` Gb/s."""
    return total_bytes * (gpus - 1) / gpus / (bandwidth_gbps * 1e9 / 8)


def plan(
    config,
    recipe_name,
    nodes,
    gpus_per_node,
    gpu_memory_gib=80.0,
    mfu=0.40,
    peak_tflops=989.0,
    shape_name=None,
    bandwidth_gbps=None,
):
    """Options (micro-batch x checkpointing x offload) with memory and step time; the best that fits."""
    shape = shape_for(config, recipe_name, shape_name)
    gpus = nodes * gpus_per_node
    group = 1 + config.loss.hard_negatives
    lq, lp = config.data.query_max_length, config.data.passage_max_length
    tokens_per_query = lq + group * lp
    global_batch = config.train.global_batch_size
    lora = config.model.lora
    lora_params = shape.lora_params(lora)
    step_flops = global_batch * (shape.flops_per_token(lq, lora) * lq + group * shape.flops_per_token(lp, lora) * lp)
    forward_flops = global_batch * (
        shape.forward_flops_per_token(lq, lora) * lq + group * shape.forward_flops_per_token(lp, lora) * lp
    )
    sparse = config.model.kind == "sparse"
    # multi-vector: the loss pads a micro-batch's queries and passages to one width (the longer max length)
    multi_vector = config.model.multi_vector if config.model.kind == "multi_vector" else None
    token_embeddings = (max(lq, lp), lp, multi_vector["dim"]) if multi_vector else None
    if lora and multi_vector:  # its projection is trained in full beside the adapter (model/lora.py)
        lora_params += shape.hidden_size * multi_vector["dim"]
    if sparse:  # the LM head's matmul over every token: 2 h V forward, 6 h V with the backward
        step_flops += global_batch * tokens_per_query * 6 * shape.hidden_size * shape.vocab_size
        forward_flops += global_batch * tokens_per_query * 2 * shape.hidden_size * shape.vocab_size
    chunk = config.train.grad_cache_chunk_size
    eager = config.model.attn_implementation == "eager"
    bandwidth_gbps = bandwidth_gbps or default_bandwidth_gbps(nodes)
    decision = auto_plan(config, shape, nodes, gpus_per_node, gpu_memory_gib)
    stage, param_bytes, grad_bytes = communication_dtypes(config, decision)
    logit_bytes = param_bytes if sparse else 0  # the LM head's logits are in the parameters' dtype
    options = []
    for offload in ("none", "optimizer", "optimizer+params"):
        for checkpointing in (False, True):
            micro = 1
            while micro * gpus <= global_batch and global_batch % (micro * gpus) == 0:
                queries_per_forward = chunk if chunk and chunk < micro and micro % chunk == 0 else micro
                scores = attention_score_bytes(shape, queries_per_forward, [lq] + [lp] * group) if eager else 0.0
                parts = memory_per_gpu(
                    shape,
                    gpus,
                    micro,
                    tokens_per_query,
                    group,
                    checkpointing,
                    offload,
                    config.loss.negatives == "global",
                    queries_per_forward,
                    scores,
                    lora_params,
                    stage,
                    logit_bytes,
                    token_embeddings=token_embeddings,
                )
                # forwards repeated: checkpointing's recompute, GradCache's no-grad pass (full
                # fine-tuning: x 4/3 each with 1/3 of the step's FLOPs in the forward; LoRA: x 3/2)
                repeated = int(checkpointing) + int(queries_per_forward < micro)
                compute = (step_flops + repeated * forward_flops) / (gpus * peak_tflops * 1e12 * mfu)
                compute *= {"none": 1.0, "optimizer": 1.15, "optimizer+params": 1.6}[offload]  # stated guesses
                accumulation = global_batch // (micro * gpus)
                gathered, reduced = communication_bytes(
                    shape.params + lora_params,
                    accumulation,
                    micro // queries_per_forward,
                    param_bytes,
                    grad_bytes,
                    stage,
                    trained=lora_params or None,
                )
                comm = communication_seconds(gathered + reduced, gpus, bandwidth_gbps)
                options.append(
                    {
                        "micro_batch": micro,
                        "accumulation": accumulation,
                        "queries_per_forward": queries_per_forward,
                        "checkpointing": checkpointing,
                        "offload": offload,
                        "memory_gib": sum(parts.values()) / GIB,
                        "parts_gib": {k: v / GIB for k, v in parts.items()},
                        "compute_seconds": compute,
                        "comm_seconds": comm,
                        "allgather_bytes": gathered,
                        "reduce_scatter_bytes": reduced,
                        "step_seconds": compute + comm,
                        "fits": sum(parts.values()) <= 0.9 * gpu_memory_gib * GIB,
                    }
                )
                micro *= 2
    fitting = [o for o in options if o["fits"]]
    best = min(fitting, key=lambda o: (o["step_seconds"], -o["micro_batch"])) if fitting else None
    return {
        "shape": shape,
        "gpus": gpus,
        "params": shape.params,
        "tokens_per_step": global_batch * tokens_per_query,
        "lengths": (lq, lp),
        "attention": config.model.attn_implementation,
        "grad_cache_chunk": chunk,
        "options": options,
        "best": best,
        "mfu": mfu,
        "gpu_memory_gib": gpu_memory_gib,
        "bandwidth_gbps": bandwidth_gbps,
        "zero_stage": stage,
        "grad_comm_bytes": grad_bytes,
        "lora": lora,
        "lora_params": lora_params,
        "auto": decision,
        "config": config,
        "nodes": nodes,
        # a ZeRO checkpoint: fp32 master weights and both Adam moments of every trained parameter
        # (DeepSpeed's *_optim_states.pt; the model states files are small under ZeRO-3)
        "checkpoint_bytes": 12 * (lora_params or shape.params),
    }


def auto_plan(config, shape, nodes, gpus_per_node, gpu_memory_gib):
    """What deepspeed.config=auto / train.activation_checkpointing=auto would choose on this
    cluster (the decision training makes at start, embedtrain.autoconfig); None when the recipe
    sets both explicitly."""
    from embedtrain.config import AUTO, auto_decision, deepspeed_config_path

    name = config.deepspeed.get("config", "zero3.json")
    if name != AUTO and config.train.activation_checkpointing != AUTO:
        return None
    stage = (config.deepspeed.get("zero_optimization") or {}).get("stage")
    if stage is None and name != AUTO:
        stage = json.loads(deepspeed_config_path(name).read_text()).get("zero_optimization", {}).get("stage", 0)
    hardware = Hardware(nodes, gpus_per_node, gpu_memory_gib * GIB, "--gpu-memory")
    return auto_decision(config, nodes * gpus_per_node, stage, hardware, shape)


def format_auto(decision, config):
    """The auto decision as `embedtrain plan` and the start of training print it."""
    text = decision.reason if decision.fits else f"WARNING: {decision.reason}"
    return (
        f"auto (deepspeed.config={config.deepspeed.get('config', 'zero3.json')}, train.activation_checkpointing="
        f"{config.train.activation_checkpointing}): {text}"
    )


def format_plan(result):
    shape, best = result["shape"], result["best"]
    lines = [
        f"model: {result['params'] / 1e9:.2f}B parameters ({shape.num_hidden_layers} layers, hidden "
        f"{shape.hidden_size}, {shape.num_attention_heads} query / {shape.num_key_value_heads} KV heads of "
        f"{shape.head_dim}); {result['gpus']} GPU(s) of {result['gpu_memory_gib']:.0f} GiB; "
        f"{result['tokens_per_step']:,} padded tokens per step (query {result['lengths'][0]}, passages "
        f"{result['lengths'][1]} tokens, {result['attention']} attention"
        + (f", GradCache chunks of {result['grad_cache_chunk']}" if result["grad_cache_chunk"] else "")
        + f"); step time = compute at {result['mfu']:.0%} MFU + communication (ZeRO-{result['zero_stage']} "
        f"all-gather + reduce-scatter with {'fp32' if result['grad_comm_bytes'] == 4 else '16-bit'} gradients, "
        f"{result['bandwidth_gbps']:,.0f} Gb/s per GPU, added, not overlapped)",
        f"{'micro':>5} {'accum':>5} {'ckpt':>5} {'offload':>16} {'GiB/GPU':>8} {'GB comm':>8} {'comm s':>7} "
        f"{'s/step':>7}  fits",
    ]
    if result["lora"]:
        lora, trained = result["lora"], result["lora_params"]
        lines.insert(
            1,
            f"LoRA rank {lora['r']} on {', '.join(lora['target_modules'])}: {trained / 1e6:,.1f}M trainable "
            f"parameters ({trained / result['params']:.2%} of the base, which is frozen); optimizer state (fp32 "
            f"master + Adam moments, 12 bytes each) for the adapter only: {12 * trained / result['gpus'] / GIB:.3f} "
            f"GiB per GPU (full fine-tuning: {12 * result['params'] / result['gpus'] / GIB:.1f} GiB); gradients "
            "reduce-scattered for the adapter only",
        )
    for o in result["options"]:
        lines.append(
            f"{o['micro_batch']:>5} {o['accumulation']:>5} {str(o['checkpointing']):>5} {o['offload']:>16} "
            f"{o['memory_gib']:>8.1f} {(o['allgather_bytes'] + o['reduce_scatter_bytes']) / 1e9:>8.1f} "
            f"{o['comm_seconds']:>7.2f} {o['step_seconds']:>7.2f}  {'yes' if o['fits'] else 'no'}"
        )
    if result["auto"] is not None:
        lines.append(format_auto(result["auto"], result["config"]))
    if best is None:
        lines.append("recommendation: nothing fits; use more GPUs, shorter sequences or fewer hard negatives")
    else:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in best["parts_gib"].items())
        lines.append(
            f"recommendation: micro-batch {best['micro_batch']} x accumulation {best['accumulation']}, "
            f"activation checkpointing {'on' if best['checkpointing'] else 'off'}, offload "
            f"{best['offload']}: {best['memory_gib']:.1f} GiB per GPU ({parts}), "
            f"{best['step_seconds']:.2f} s per step (communication {best['comm_seconds']:.2f} s: "
            f"{best['allgather_bytes'] / 1e9:.1f} GB all-gathered + {best['reduce_scatter_bytes'] / 1e9:.1f} "
            "GB reduce-scattered per GPU)"
        )
    lines.append(format_save_time(result))
    return "\n".join(lines)


WRITE_GBPS_PER_NODE = 1.0  # an assumption, not a measurement: GB/s one node writes to the run folder
GRACE_SECONDS = 300  # launch/slurm templates: --signal=B:USR1@300


def format_save_time(result):
    """One line: the checkpoint's size and the time to write it, every node writing its ranks'
    shards at WRITE_GBPS_PER_NODE, plus the two steps a stop request may wait for (the step in
    flight and the one in which the ranks agree), against the templates' grace period
    (docs/reliability.md)."""
    size = result["checkpoint_bytes"]
    seconds = size / result["nodes"] / (WRITE_GBPS_PER_NODE * 1e9)
    steps = 2 * result["best"]["step_seconds"] if result["best"] else 0.0
    verdict = "within" if seconds + steps < GRACE_SECONDS else "LONGER than"
    return (
        f"checkpoint: {size / 1e9:,.1f} GB (12 bytes per trained parameter), about {seconds:,.0f} s to save at "
        f"an assumed {WRITE_GBPS_PER_NODE:g} GB/s per node; a stop takes up to 2 steps ({steps:,.0f} s) more: "
        f"{verdict} the {GRACE_SECONDS} s the Slurm templates leave before the time limit (on preemption the "
        "partition's GraceTime)"
    )


def plan_command(recipe, overrides, *args):
    """`embedtrain plan`: the recipe with its overrides (and placeholder paths), planned (plan()'s
    arguments after the recipe name) and printed."""
    config = load_config(recipe, [*placeholder_paths(recipe, overrides), *overrides])
    print(format_plan(plan(config, recipe_path(recipe).stem, *args)), flush=True)


def placeholder_paths(recipe, overrides):
    """plan needs no data and, with a known shape, no checkpoint: fill the paths that neither the
    recipe nor an override sets. A path the recipe sets is kept, so that load_config resolves it as
    training would (assets:tiny-llama is the tiny recipe's model, whose config.json gives the shape)."""
    sections = yaml.safe_load(recipe_path(recipe).read_text()) or {}
    given = {o.split("=", 1)[0].strip() for o in overrides}
    for key in ("model.path", "data.path"):
        section, name = key.split(".")
        if isinstance(sections, dict) and isinstance(sections.get(section), dict) and sections[section].get(name):
            given.add(key)
    return [f"{key}=unset" for key in ("model.path", "data.path") if key not in given]
