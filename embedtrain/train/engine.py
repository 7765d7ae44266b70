"""Build the DeepSpeed engine: model (partitioned at load time under ZeRO-3), activation
checkpointing, AdamW with no decay on norms and biases, the LR schedule."""

import math

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from embedtrain.config import checkpoint_every, precision_dtype
from embedtrain.errors import ConfigError
from embedtrain.kinds import kind_of
from embedtrain.model import check_bidirectional, load_backbone
from embedtrain.model.families import family_of
from embedtrain.model.lora import add_lora


def decoder_layers(backbone):
    """The backbone's decoder layers, in order (every supported family keeps them in `.layers`)."""
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(backbone).__name__} has no decoder layers at .layers")
    return list(layers)


def enable_activation_checkpointing(backbone, use_reentrant=False, every=1):
    """Checkpoint every `every`-th decoder layer (layers 0, k, 2k, ...; 1 = all). Non-reentrant only
    in training: reentrant checkpointing with ZeRO-3 and two encoder forwards before one backward
    gives silently wrong gradients (docs/design.md, DeepSpeed facts we rely on); `use_reentrant`
    exists so a test can show it. Partial checkpointing sets each layer's own switch: transformers'
    GradientCheckpointingLayer checkpoints a layer when its `gradient_checkpointing` is true (older
    releases decide in the model's loop for every layer at once, so they take k=1 only)."""
    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(backbone, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if every == 1:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = decoder_layers(backbone)
    if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        raise ConfigError(
            f"train.activation_checkpointing={every}: checkpointing every k-th layer needs decoder layers that "
            "switch it per layer (transformers' GradientCheckpointingLayer); use true or false with this release"
        )
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0


def parameter_groups(model, weight_decay, learning_rates=None):
    """AdamW groups over the trainable parameters only (a frozen LoRA base gets no optimizer state):
    matrices decay; norms (1-D) and biases do not. `learning_rates` ({name prefix: lr}, the model
    kind's learning_rates): the parameters under a prefix form groups of their own with that "lr"
    (the others take the optimizer's). An empty group (LoRA: no 1-D weights) is left out."""
    learning_rates = learning_rates or {}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 params are flattened placeholders
        decays = not (len(shape) < 2 or name.endswith(".bias"))
        lr = next((rate for prefix, rate in learning_rates.items() if name.startswith(prefix)), None)
        groups.setdefault((lr, decays), []).append(param)
    ordered = sorted(groups, key=lambda key: (key[0] is not None, key[0] or 0.0, not key[1]))
    return [
        {"params": groups[lr, decays], "weight_decay": weight_decay if decays else 0.0, **({"lr": lr} if lr else {})}
        for lr, decays in ordered
    ]


def lr_multiplier(step, warmup_steps, max_steps, schedule, min_ratio):
    """Linear warm-up from 0 to 1 over `warmup_steps`, then linear/cosine decay to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def build_encoder(config, dtype, use_reentrant=False, teacher_dim=None, checkpointing=None):
    """The model to train, the model kind's module around the loaded backbone (embedtrain.kinds): an
    Encoder, a PairScorer, or with loss.distill a ProjectedEncoder whose projection maps the
    student's width to `teacher_dim` (the teacher cache's). `checkpointing`:
    every how many decoder layers to checkpoint (0 = off); default train.activation_checkpointing
    (which must then not be `auto`: build_engine resolves that from the DeepSpeed config)."""
    if checkpointing is None:
        value = config.train.activation_checkpointing
        if value == "auto":
            raise ConfigError("train.activation_checkpointing=auto: resolved with the DeepSpeed config (build_engine)")
        checkpointing = int(value) if isinstance(value, bool) else value
    backbone = load_backbone(
        config.model.path,
        dtype=dtype,
        attn_implementation=config.model.attn_implementation,
        pooling=config.model.pooling,
    )
    family = family_of(backbone.config.model_type)
    kind = kind_of(config)
    kind.check_family(family, config)
    backbone.config.temperature = config.loss.temperature
    if config.loss.matryoshka_dims:
        too_large = [d for d in config.loss.matryoshka_dims if d > backbone.config.hidden_size]
        if too_large:
            raise ConfigError(
                f"loss.matryoshka_dims {too_large} exceed the model's hidden size {backbone.config.hidden_size}"
            )
        backbone.config.matryoshka_dims = list(config.loss.matryoshka_dims)  # recorded in exports
    if config.model.liger_kernels:
        if family.liger is None:
            raise ConfigError(f"model.liger_kernels=true: liger-kernel has no patch for the {family.name} family")
        apply_liger_kernels(backbone, family.liger)
    if config.model.lora is not None:
        # after loading (under ZeRO-3 the base is partitioned already; the new adapter weights are
        # whole until deepspeed.initialize partitions them, broadcasting rank 0's values), before
        # checkpointing wraps the layers
        add_lora(backbone, config.model.lora, config.train.seed)
    if checkpointing:
        enable_activation_checkpointing(backbone, use_reentrant=use_reentrant, every=checkpointing)
    return kind.build_module(config, backbone, dtype, teacher_dim)


def set_leaf_modules(encoder):
    """ZeRO-3 fetches and releases the weights of a leaf module as one unit: its hooks sit on the
    decoder layer, not on each of its ~13 submodules (in forward, recompute and backward), which
    cuts the host time of a micro-step (docs/training.md, Performance). Set before
    deepspeed.initialize, which registers the hooks."""
    from deepspeed.utils import set_z3_leaf_modules

    layer_class = type(decoder_layers(encoder.backbone)[0])
    set_z3_leaf_modules(encoder, [layer_class])
    return layer_class


def build_optimizer(encoder, config, ds_config):
    """AdamW over parameter_groups. An offloaded optimizer steps on the host: DeepSpeed's vectorised
    CPU Adam (JIT-built once). On CUDA torch's fused AdamW: one kernel per step instead of a dozen
    per parameter tensor and none of their temporaries (the non-fused step's were the 1B recipe's
    peak memory on an H100, issue 26); DeepSpeed's ZeRO optimizers wrap it like any client
    optimizer, whose param groups they point at their fp32 partitions. The CPU keeps the plain one."""
    groups = parameter_groups(encoder, config.optim.weight_decay, kind_of(config).learning_rates(config))
    adam = dict(lr=config.train.lr, betas=tuple(config.optim.betas), eps=config.optim.eps)
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)
    if torch.cuda.is_available():
        return torch.optim.AdamW(groups, fused=True, **adam)
    return torch.optim.AdamW(groups, **adam)


def compile_layers(backbone):
    """train.compile: torch.compile each decoder layer (dynamic shapes: packed rows and padded
    batches change length from one micro-batch to the next). A layer is the unit that repeats, so
    one graph serves every layer; the embedding, final norm, pooling and loss stay eager, and the
    ZeRO-3 hooks (on the layer when it is a leaf module, compiler-disabled by DeepSpeed otherwise)
    break the graph only at its edges. Compiling the whole wrapped engine (engine.compile) traced
    the hooks, the loss and the gathers as well."""
    layers = decoder_layers(backbone)
    for layer in layers:
        layer.compile(dynamic=True)
    return layers


def apply_liger_kernels(backbone, function="apply_liger_kernel_to_llama"):
    """Liger's fused Triton kernels for RMSNorm, SwiGLU and RoPE on this model's modules
    (model.liger_kernels; `pip install liger-kernel`, CUDA only), through the family's liger
    function. Same results within dtype tolerance (tests/test_gpu.py), less activation memory and
    fewer kernel launches."""
    try:
        import liger_kernel.transformers as liger
    except ImportError as err:
        raise ConfigError(f"model.liger_kernels=true needs the liger-kernel package (CUDA and Triton): {err}") from err
    getattr(liger, function)(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=backbone
    )


def build_engine(config, ds_config, use_reentrant=False, teacher_dim=None, leaf_modules=True):
    """deepspeed.initialize on the encoder. Under ZeRO-3 the weights are partitioned while they
    load: HfDeepSpeedConfig must stay alive during from_pretrained (zero.Init directly crashed).
    `teacher_dim`: the teacher's embedding width, with loss.distill. `leaf_modules`: under ZeRO-3
    the decoder layers are leaf modules (set_leaf_modules). That needs one encoder forward per
    backward, which embedtrain's step always does (queries and passages in one forward; GradCache
    one backward per chunk): with two forwards before one backward DeepSpeed 0.19.8 asserts on a
    parameter reduced twice in one bucket. False exists so a test of that pattern can run."""
    if config.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            "model.attn_implementation=flex_attention: FlexAttention has no backward on the CPU; "
            "train with sdpa there (the two give the same embeddings)"
        )
    dtype = precision_dtype(ds_config)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841 (kept alive on purpose)
    if config.loss.distill is not None and not teacher_dim:
        raise ConfigError("loss.distill: the teacher's embedding width is needed to build the projection")
    encoder = build_encoder(config, dtype, use_reentrant, teacher_dim, checkpoint_every(config, ds_config))
    if zero3 and leaf_modules:  # auto or an explicit JSON: one fetch per decoder layer, not per submodule
        set_leaf_modules(encoder)
    optimizer = build_optimizer(encoder, config, ds_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, config.optim.warmup_steps, config.train.max_steps, config.optim.schedule, config.optim.min_lr_ratio
        ),
    )
    engine, _, _, _ = deepspeed.initialize(model=encoder, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    check_bidirectional(engine.module.backbone)
    if config.train.compile:
        compile_layers(engine.module.backbone)
    del hf_ds_config
    engine.train()  # from_pretrained leaves the model in eval mode, which also disables checkpointing
    return engine
