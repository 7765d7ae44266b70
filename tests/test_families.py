"""Backbone families beyond Llama (embedtrain.model.families): Mistral, Ministral3 and Qwen3 from
tiny random checkpoints. Bidirectional on every layout and attention path, refused at start-up when
a path stays causal, 2-rank ZeRO-3 gradients equal a plain PyTorch step, and the stock-format export
gives embedtrain's vectors through transformers' AutoModel (no remote code) and sentence-transformers,
left and right padded."""

import json

import pytest
import torch

from conftest import embedtrain_cli, run_scenarios, run_worker
from embedtrain.config import ConfigError, load_config
from embedtrain.model import check_bidirectional, load_backbone
from embedtrain.model.encoder import causal_layouts
from embedtrain.model.families import FAMILIES, family_of
from embedtrain.model.tiny import CLASSES, make_tiny, make_tiny_wrapper

FAMILY_NAMES = sorted(CLASSES)
TEXTS = [
    "Who wrote the novel about the white whale?",
    "Rivers carry water from the mountains down to the sea over many years.",
    "A short one.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny(family, root / family) for family in FAMILY_NAMES}


def test_every_family_has_one_entry_per_model_type():
    model_types = [t for family in FAMILIES for t in family.model_types]
    assert len(model_types) == len(set(model_types))
    assert {family_of(t).name for t in ("llama", "mistral", "ministral3", "qwen3")} == {
        "llama",
        "mistral",
        "ministral3",
        "qwen3",
    }


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bidirectional_on_every_layout(tiny, family, attn):
    backbone = load_backbone(tiny[family], attn_implementation=attn)
    assert type(backbone).__name__ == f"{CLASSES[family][1].removesuffix('ForCausalLM')}BidirectionalModel"
    assert causal_layouts(backbone) == []
    assert backbone.config.is_causal is False and backbone.config.sliding_window is None


def test_an_attention_that_ignores_is_causal_is_refused(tiny):
    """A release whose attention reads its own causal flag, not the config's: the maskless path
    (a batch without padding) runs causal, and the start-up check names it."""
    backbone = load_backbone(tiny["qwen3"])
    for layer in backbone.layers:
        layer.self_attn.is_causal = True
    assert causal_layouts(backbone) == ["full"]
    with pytest.raises(RuntimeError, match=r"causal on the full path\(s\) of Qwen3BidirectionalModel"):
        check_bidirectional(backbone)


PARITY_FAMILIES = ["mistral", "qwen3"]


@pytest.fixture(scope="module")
def two_rank_parity(tiny, tmp_path_factory):
    """grad_parity.py on 2 ranks for each family of PARITY_FAMILIES, in one launch."""
    scenarios = {
        family: ["--negatives", "global", "--model", tiny[family], "--grad-cache", "1"] for family in PARITY_FAMILIES
    }
    return run_scenarios("grad_parity.py", scenarios, tmp_path_factory.mktemp("grad_parity"), nproc=2)


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_two_rank_zero3_global_pool_matches_plain_pytorch(two_rank_parity, family):
    """ZeRO-3 with activation checkpointing, GradCache chunks and the global pool on 2 ranks against
    one plain PyTorch process holding the whole global batch (fp32, relative 1e-5)."""
    result = two_rank_parity[family]
    assert result["backbone"].lower().startswith(family)
    assert abs(result["ds_loss"] - result["ref_loss"]) <= 1e-5 * abs(result["ref_loss"])
    assert result["max_rel_error"] < 1e-5, result


def stock_embeddings(folder, padding_side):
    """Mean-pooled, normalised vectors from transformers' own AutoModel (no remote code)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side=padding_side)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), model


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stock_export_gives_embedtrains_vectors(tiny, family, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    result = embedtrain_cli(
        "train", "--config", "tiny", "--output-dir", run,
        "--set", f"model.path={tiny[family]}", "--set", "train.max_steps=2", "--set", "data.subsets=[FEVER]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = embedtrain_cli("export", run, out)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [
        CLASSES[family][1].replace("ForCausalLM", "Model")
    ]
    assert config["is_causal"] is False and "auto_map" not in config and not list(out.glob("*.py"))

    from sentence_transformers import SentenceTransformer

    from embedtrain import BiEncoder

    ours = torch.from_numpy(BiEncoder.from_pretrained(out, device="cpu", dtype="float32").encode(TEXTS))
    for side in ("right", "left"):
        theirs, model = stock_embeddings(out, side)
        assert float((ours * theirs).sum(-1).min()) > 0.99999, side
    assert causal_layouts(model) == []  # transformers' own model honours is_causal: false
    st = torch.from_numpy(SentenceTransformer(str(out), device="cpu").encode(TEXTS))
    assert float((ours * st).sum(-1).min()) > 0.99999


def test_reranker_is_refused_for_a_stock_family(tiny, tmp_path):
    from embedtrain.train.engine import build_encoder

    config = load_config("tiny_reranker", [f"model.path={tiny['qwen3']}"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="model.kind=reranker: not supported for the qwen3 family"):
        build_encoder(config, torch.float32)


def test_a_vision_language_wrapper_trains_its_language_model(tmp_path):
    """mistralai's Ministral 3 checkpoints are `mistral3` wrappers: embedtrain reads the text config
    and the language model's weights (`language_model.model.*`), not a random init."""
    from safetensors.torch import load_file

    folder = make_tiny_wrapper(tmp_path / "mistral3")
    backbone = load_backbone(folder)
    weights = load_file(str(folder / "model.safetensors"))
    assert type(backbone).__name__ == "Ministral3BidirectionalModel" and causal_layouts(backbone) == []
    assert torch.equal(
        backbone.layers[1].mlp.up_proj.weight, weights["language_model.model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(backbone.embed_tokens.weight, weights["language_model.model.embed_tokens.weight"])


def test_lora_on_qwen3_matches_plain_peft(tiny, tmp_path):
    """LoRA adapters on a frozen Qwen3 base under ZeRO-3 on 2 ranks: the gradients of plain PyTorch
    with peft, optimizer state for the adapters only."""
    result, _ = run_worker("lora_parity.py", tmp_path / "r.json", "--model", tiny["qwen3"], nproc=2)
    assert result["max_rel_error"] < 1e-5, result
    assert result["optimizer_master_numel"] == result["lora_numel"] < result["model_numel"]
