"""bf16 gradient accumulation in fp32 (data_types.grad_accum_dtype, set by config.set_grad_accum_dtype):
the engine's accumulation buffers are fp32 under every ZeRO stage, and an accumulated step of 8
micro-steps is closer to the exact sum than with DeepSpeed's default (accumulation in bf16)."""

import pytest

from conftest import run_worker
from embedtrain.config import deepspeed_config, load_config
from embedtrain.errors import ConfigError


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """Stages 1-3, each with embedtrain's default and with grad_accum_dtype=bf16, in one launch."""
    result, _ = run_worker("grad_accum.py", tmp_path_factory.mktemp("grad_accum") / "r.json", timeout=300)
    return result


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_in_fp32(accumulated, stage):
    default, bf16 = accumulated[f"zero{stage}_default"], accumulated[f"zero{stage}_bf16"]
    assert default["grad_accum_dtype"] == "fp32"
    assert default["buffers"] and set(default["buffers"].values()) == {"torch.float32"}, default
    # bf16 summands added in fp32: exact up to fp32 rounding, where a bf16 sum of 8 loses ~0.3 %
    assert bf16["error_vs_exact"] > 1e-3, bf16
    if stage == 1:
        # BF16_Optimizer all-reduces the fp32 sum at the boundary in communication_data_type (bf16
        # by default, engine.py allreduce_bucket): one rounding of the sum is left
        assert default["error_vs_exact"] < 0.6 * bf16["error_vs_exact"], (default, bf16)
    else:
        assert default["error_vs_exact"] < 1e-6, default
    # against the fp32 model, bf16 compute's own error stays, the accumulation error goes
    assert default["error_vs_fp32"] < bf16["error_vs_fp32"], (default, bf16)


def test_grad_accum_dtype_owner():
    """Every bf16 ZeRO config gets fp32; an explicit setting wins; stage 0 keeps bf16 and refuses fp32
    (DeepSpeed has no bf16-with-fp32-accumulation path without ZeRO)."""

    def resolved(*overrides):
        return deepspeed_config(load_config("tiny", ["deepspeed.bf16.enabled=true", *overrides]), 1)

    assert resolved()["data_types"] == {"grad_accum_dtype": "fp32"}
    assert resolved("deepspeed.config=zero2.json")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert resolved("deepspeed.data_types.grad_accum_dtype=bf16")["data_types"] == {"grad_accum_dtype": "bf16"}
    assert "data_types" not in deepspeed_config(load_config("tiny"), 1)  # fp32 parameters: nothing to do
    assert "data_types" not in resolved("deepspeed.zero_optimization.stage=0")
    with pytest.raises(ConfigError, match="grad_accum_dtype=fp32 with bf16 and zero_optimization.stage=0"):
        resolved("deepspeed.zero_optimization.stage=0", "deepspeed.data_types.grad_accum_dtype=fp32")
