"""The backbone is bidirectional, padding-invariant, and loads any Llama checkpoint folder."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from embedtrain.model import Encoder, LlamaBidirectionalConfig, LlamaBidirectionalModel, load_backbone
from embedtrain.model.encoder import attention_is_bidirectional, check_bidirectional

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def small_model(attn="sdpa"):
    torch.manual_seed(0)
    config = LlamaBidirectionalConfig(**SMALL)
    config._attn_implementation = attn
    return LlamaBidirectionalModel(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_changing_the_last_token_changes_the_first_output(attn):
    assert attention_is_bidirectional(small_model(attn))


def test_a_stock_causal_llama_fails_the_same_check():
    torch.manual_seed(0)
    causal = LlamaModel(LlamaConfig(**SMALL)).eval()
    assert not attention_is_bidirectional(causal)
    with pytest.raises(RuntimeError, match="attention is causal on the full, padded path"):
        check_bidirectional(causal)


def test_eager_and_sdpa_agree():
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out_sdpa = small_model("sdpa")(input_ids=ids, attention_mask=mask).last_hidden_state
    out_eager = small_model("eager")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out_sdpa[mask.bool()], out_eager[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["avg", "cls", "last", "weighted_avg"])
def test_padding_changes_nothing(side, pooling):
    encoder = Encoder(small_model(), pooling=pooling).eval()
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    alone = encoder(ids, torch.ones_like(ids))
    pad_ids, pad_mask = torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    if side == "right":
        padded_ids, mask = torch.cat([ids, pad_ids], 1), torch.cat([torch.ones_like(ids), pad_mask], 1)
    else:
        padded_ids, mask = torch.cat([pad_ids, ids], 1), torch.cat([pad_mask, torch.ones_like(ids)], 1)
    torch.testing.assert_close(encoder(padded_ids, mask), alone, rtol=1e-5, atol=1e-6)


def test_embeddings_are_unit_fp32():
    encoder = Encoder(small_model())
    ids = torch.randint(0, 128, (3, 5))
    out = encoder(ids, torch.ones_like(ids))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("source", [LlamaForCausalLM, LlamaModel])
def test_loads_causal_lm_and_base_model_folders(tmp_path, source):
    torch.manual_seed(0)
    original = source(LlamaConfig(**SMALL))
    original.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert any(k.startswith("model.") for k in keys) == (source is LlamaForCausalLM)
    backbone = load_backbone(tmp_path)
    assert isinstance(backbone, LlamaBidirectionalModel) and attention_is_bidirectional(backbone)
    base = original.model if source is LlamaForCausalLM else original
    torch.testing.assert_close(backbone.embed_tokens.weight, base.embed_tokens.weight)
    torch.testing.assert_close(backbone.layers[1].mlp.down_proj.weight, base.layers[1].mlp.down_proj.weight)


def test_a_checkpoint_of_an_unsupported_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a checkpoint of a supported family.*model_type='bert'.*qwen3"):
        load_backbone(tmp_path)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_backbone(tmp_path)


def test_missing_backbone_weights_are_an_error_not_a_random_init(tmp_path):
    LlamaModel(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks backbone weights: layers.1.mlp.up_proj.weight"):
        load_backbone(tmp_path)
