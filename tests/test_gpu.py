"""The CUDA path, with the tiny model: a bf16 ZeRO-3 step matches fp32, the bf16 non-finite guard
skips and counts a NaN step, attention backends agree (padded and packed in several rows), every
packed kernel (varlen_attn, flash-attn, FlexAttention) passes the two-row self-test and sdpa's
gradients, the packed step never syncs, and GPU bf16 encoding equals CPU fp32 encoding.

    python -m pytest -q -m gpu -n 0 tests       # on a GPU machine; skipped where CUDA is missing
    EMBEDTRAIN_GPU_TESTS_ON_CPU=1 python -m pytest -q tests/test_gpu.py   # the same checks on the CPU

Every test is marked `gpu`; tests/conftest.py skips them when torch.cuda.is_available() is False,
unless EMBEDTRAIN_GPU_TESTS_ON_CPU=1, which runs them on the CPU (bf16 there uses other kernels:
that checks the tests themselves, not the GPU).
"""

import importlib.util

import numpy as np
import pytest
import torch
from test_long import padded, random_ids  # the same layouts as the CPU long-text tests

from conftest import run_worker
from embedtrain.model import Encoder, load_backbone
from embedtrain.model.packing import pack_rows

pytestmark = pytest.mark.gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# bf16 keeps 8 significant bits: unit roundoff 2^-8 = 3.9e-3 per rounding. A forward and backward
# through 2 layers, pooled and scored at temperature 0.05 (cosines x 20), accumulates a few of those:
# on the CPU the tiny model's bf16 step is off by 0.2 % in the loss and 0.6 % in the whole gradient
# (0.9 % in the worst tensor). The bounds leave 3-10x room for other kernels, and are far below what
# a real bug gives (a wrong mask, a dropped gradient, a missing reduction: errors of order 1).
BF16_LOSS_REL = 2e-2
BF16_GRAD_REL = 3e-2  # relative L2 error of the whole gradient (all parameters together)
BF16_TENSOR_REL = 1e-1  # of any single parameter's gradient (small norms amplify relative error)
BF16_GRAD_COSINE = 0.999
# embeddings are unit vectors of 64 fp32 values (about 0.125 each): fp32 kernels differ in
# summation order only (~1e-6); bf16 activations move them by about 1e-3.
FP32_EMBED_ATOL = 2e-5
BF16_EMBED_COSINE = 0.999  # measured on the CPU: 0.99998, largest element error 2e-3
BF16_EMBED_ATOL = 1e-2
FLASH = importlib.util.find_spec("flash_attn") is not None


def test_bf16_zero3_step_matches_fp32_reference(tmp_path):
    """1 rank, ZeRO-3, bf16, checkpointing: loss and gradients vs a plain fp32 step from the same
    (bf16-rounded) weights."""
    result, _ = run_worker("gpu_step.py", tmp_path / "r.json", "--mode", "parity", timeout=240)
    assert result["device"].startswith(DEVICE) and result["param_dtype"] == "torch.bfloat16", result
    summary = {k: v for k, v in result.items() if k != "per_tensor"}
    assert abs(result["ds_loss"] - result["ref_loss"]) <= BF16_LOSS_REL * abs(result["ref_loss"]), summary
    assert result["total_rel_error"] < BF16_GRAD_REL, summary
    assert result["cosine"] > BF16_GRAD_COSINE, summary
    assert result["max_rel_error"] < BF16_TENSOR_REL, summary
    assert result["total_rel_error"] > 1e-5, summary  # really bf16 arithmetic, not an fp32 run


def test_bf16_non_finite_step_is_skipped_and_counted(tmp_path):
    """Step 2's loss is NaN: DeepSpeed skips it (no weight changes, all finite), counts it in
    engine.skipped_steps, and step 3 updates again."""
    result, _ = run_worker("gpu_step.py", tmp_path / "r.json", "--mode", "nan", timeout=240)
    assert result["device"].startswith(DEVICE) and result["param_dtype"] == "torch.bfloat16", result
    assert result["skipped"] == [0, 1, 1], result
    assert result["changed"] == [True, False, True], result
    assert all(result["finite"]), result
    assert np.isfinite(result["losses"][0]) and np.isfinite(result["losses"][2]), result


SEQUENCES = [random_ids(n, seed) for seed, n in enumerate((7, 300, 64, 129, 1))]


@torch.no_grad()
def embed_layouts(tiny_llama, attn_implementation, dtype):
    """{layout: (5, D) fp32 embeddings} of SEQUENCES, right- and left-padded and packed in one row."""
    encoder = Encoder(load_backbone(tiny_llama, dtype=dtype, attn_implementation=attn_implementation)).to(DEVICE)
    encoder.eval()
    out = {}
    for side in ("right", "left"):
        ids, mask = padded(SEQUENCES, side)
        out[side] = encoder(ids.to(DEVICE), mask.to(DEVICE)).float().cpu()
    # two rows or more of several sequences (trailing padding included), on the kernel chosen for them
    out["packed"] = encoder(pack_rows(SEQUENCES, 320, pad_to_multiple_of=64).to(DEVICE)).float().cpu()
    return out


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@pytest.fixture
def no_tf32():
    """fp32 means fp32: TF32 matmuls (10-bit mantissa) would break the 2e-5 bound if anything
    turned them on in this process."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("backend", ["sdpa", "flash_attention_2"])
def test_attention_backends_agree_padded_and_packed(tiny_llama, backend, no_tf32):
    """Against eager in fp32, every layout: sdpa in fp32 to summation order, sdpa/flash in bf16 to
    bf16 rounding (and eager bf16 too, so a bf16-only eager bug shows)."""
    if backend == "flash_attention_2" and not (FLASH and DEVICE == "cuda"):
        pytest.skip("flash_attn is not importable (or no CUDA)")
    reference = embed_layouts(tiny_llama, "eager", torch.float32)
    for layout in ("left", "packed"):  # the reference itself: layouts agree
        assert float((reference[layout] - reference["right"]).abs().max()) < FP32_EMBED_ATOL, layout
    if backend == "sdpa":
        fp32 = embed_layouts(tiny_llama, "sdpa", torch.float32)
        for layout, got in fp32.items():
            error = float((got - reference[layout]).abs().max())
            assert error < FP32_EMBED_ATOL, (layout, error)
    bf16 = {
        backend: embed_layouts(tiny_llama, backend, torch.bfloat16),
        "eager": embed_layouts(tiny_llama, "eager", torch.bfloat16),
    }
    for name, layouts in bf16.items():
        for layout, got in layouts.items():
            assert torch.isfinite(got).all(), (name, layout)
            worst, error = float(cosines(got, reference[layout]).min()), float((got - reference[layout]).abs().max())
            assert worst >= BF16_EMBED_COSINE and error < BF16_EMBED_ATOL, (name, layout, worst, error)


PACKED_KERNELS = {  # kernel -> (attn_implementation, dtype it runs in)
    "varlen": ("sdpa", torch.bfloat16),  # torch.nn.attention.varlen.varlen_attn
    "flex": ("sdpa", torch.float32),  # FlexAttention with the document BlockMask (sdpa in fp32)
    "flash": ("flash_attention_2", torch.bfloat16),  # flash-attn's varlen function via transformers
}


def kernel_encoder(tiny_llama, kernel):
    from embedtrain.model.attention import choose_kernel, varlen_available

    if DEVICE != "cuda":
        pytest.skip("a CUDA kernel")
    if kernel == "flash" and not FLASH:
        pytest.skip("flash_attn is not importable")
    if kernel == "varlen" and not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    implementation, dtype = PACKED_KERNELS[kernel]
    encoder = Encoder(load_backbone(tiny_llama, dtype=dtype, attn_implementation=implementation)).to(DEVICE)
    assert choose_kernel(encoder.backbone.config, DEVICE, dtype) == kernel  # the one training gets
    return encoder, dtype


@pytest.mark.parametrize("kernel", list(PACKED_KERNELS))
def test_packed_kernel_two_rows_self_test_and_gradients_equal_sdpa_mask(tiny_llama, kernel, no_tf32):
    """Each CUDA kernel for packed rows: the start-up self-test (two rows of three sequences) passes
    on it, every sequence's embedding is its embedding alone, and the gradients of a packed batch
    are those of sdpa's block mask (fp32: relative 1e-4; bf16: BF16_GRAD_REL)."""
    from embedtrain.model.encoder import causal_layouts

    encoder, dtype = kernel_encoder(tiny_llama, kernel)
    assert causal_layouts(encoder.backbone) == []
    packed = pack_rows(SEQUENCES, 320, pad_to_multiple_of=64)
    assert packed.input_ids.shape[0] >= 2
    with torch.no_grad():
        alone = torch.cat(
            [encoder(torch.tensor([s], device=DEVICE), torch.ones(1, len(s), device=DEVICE)) for s in SEQUENCES]
        )
        got = encoder(packed.to(DEVICE))
    assert float(cosines(got.float(), alone.float()).min()) >= (
        0.99999 if dtype == torch.float32 else BF16_EMBED_COSINE
    )
    grads = {}
    for name in (kernel, "mask"):
        encoder.zero_grad()
        encoder.packed_kernel = name
        embeddings = encoder(packed.to(DEVICE))
        (embeddings * torch.arange(embeddings.numel(), device=DEVICE).view_as(embeddings)).sum().backward()
        grads[name] = torch.cat([p.grad.float().flatten() for p in encoder.parameters()])
    bound = 1e-4 if dtype == torch.float32 else BF16_GRAD_REL
    assert float((grads[kernel] - grads["mask"]).norm() / grads["mask"].norm()) < bound


@pytest.mark.parametrize("option", ["compile", "liger"])
def test_compile_and_liger_keep_packed_rows_equal_in_bf16(tiny_llama, option, no_tf32):
    """train.compile (each decoder layer compiled) and model.liger_kernels on the kernel training
    uses (varlen_attn in bf16): two packed rows of three sequences give the embeddings and the
    gradients of the same model without them (bf16 bounds), and the self-test passes."""
    from embedtrain.model.encoder import causal_layouts
    from embedtrain.train.engine import apply_liger_kernels, compile_layers

    if option == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    reference, _ = kernel_encoder(tiny_llama, "varlen")
    changed, _ = kernel_encoder(tiny_llama, "varlen")
    if option == "compile":
        compile_layers(changed.backbone)
    else:
        apply_liger_kernels(changed.backbone)
    assert causal_layouts(changed.backbone) == []
    packed = pack_rows(SEQUENCES, 320, pad_to_multiple_of=64).to(DEVICE)
    results = []
    for encoder in (reference, changed):
        encoder.zero_grad()
        embeddings = encoder(packed)
        (embeddings * torch.arange(embeddings.numel(), device=DEVICE).view_as(embeddings)).sum().backward()
        results.append(
            (embeddings.detach().float(), torch.cat([p.grad.float().flatten() for p in encoder.parameters()]))
        )
    (want, want_grad), (got, got_grad) = results
    assert float(cosines(got, want).min()) >= BF16_EMBED_COSINE
    assert float((got_grad - want_grad).norm() / want_grad.norm()) < BF16_GRAD_REL


def test_packed_forward_and_backward_never_sync_on_cuda(tiny_llama):
    """torch.cuda.set_sync_debug_mode("error"): a packed batch's forward and backward on the chosen
    kernel (varlen_attn in bf16) copy nothing from the device to the host."""
    encoder, _ = kernel_encoder(tiny_llama, "varlen")
    inputs = pack_rows(SEQUENCES, 320, pad_to_multiple_of=64).pin_memory().to(DEVICE, non_blocking=True)
    encoder(inputs).sum().backward()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        encoder(inputs).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


QUERIES = ["Shilin Linlofo is a chemist.", "Which material did Dorbra Ostmorven use?", "x"]
DOCUMENTS = [
    "Dorbra Ostmorven (born 1948 in Bergen) is an architect best known for works made of copper.",
    "A short one.",
    " ".join(["river copper north chemist born museum eleven glass map song"] * 40),
]


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


def test_gpu_bf16_encode_equals_cpu_fp32_encode(exported):
    from embedtrain import BiEncoder as PublicBiEncoder

    gpu = PublicBiEncoder.from_pretrained(exported, device=DEVICE, dtype=torch.bfloat16)
    cpu = PublicBiEncoder.from_pretrained(exported, device="cpu", dtype=torch.float32)
    parameter = next(gpu.module.parameters())
    assert parameter.device.type == DEVICE and parameter.dtype == torch.bfloat16
    for texts, prompt in ((QUERIES, "query"), (DOCUMENTS, "document")):
        on_gpu = gpu.encode(texts, prompt=prompt, batch_size=2)
        on_cpu = cpu.encode(texts, prompt=prompt, batch_size=2)
        assert on_gpu.dtype == np.float32 and on_gpu.shape == on_cpu.shape == (len(texts), 64)
        assert np.isfinite(on_gpu).all()
        similarity = (on_gpu * on_cpu).sum(-1) / np.linalg.norm(on_gpu, axis=-1) / np.linalg.norm(on_cpu, axis=-1)
        assert similarity.min() >= 0.999, (prompt, similarity)
