"""LoRA (model.lora): under ZeRO-3 and ZeRO-2 the adapter's gradients equal plain PyTorch with peft
and only the adapter has optimizer state; the adapter saved under ZeRO-3 on 2 ranks is the trained
one, not empty (DeepSpeed issue 7900); the merged export, the adapter on its base (peft) and the
in-process encoder give the same embeddings, and the merged model is not the untuned base
(sentence-transformers issue 3246); a killed LoRA run resumes exactly; config errors name the key.
A multi-vector LoRA run (the session's shared launch) trains the adapter and its projection only,
saves both, resumes both, and exports a MultiVectorEncoder folder that encodes as the in-process
module and loads in sentence-transformers."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_resume import effective_stream, run

from conftest import ASSETS, shared_scenarios
from embedtrain.config import LORA_DEFAULTS, ConfigError, load_config
from embedtrain.export import export_checkpoint
from embedtrain.model import Encoder, load_backbone
from embedtrain.model.lora import ADAPTER_BASE, LORA_PARAMETER, BaseWeights, adapter_key, read_adapter
from embedtrain.plan import SHAPES, Shape, plan
from embedtrain.train.checkpoint import CheckpointError, load_checkpoint_file, rank_files, zero3_full_tensors

TOLERANCE = 1e-5
BASE = ASSETS / "tiny-llama"
LORA = ["--set", "model.lora={r: 4, alpha: 8}"]  # dropout 0.1 (the default): RNG must be restored on resume


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora={rank: 8}", r"model.lora.rank: unknown key; model.lora takes r, alpha, dropout, target_modules"),
        ("model.lora={r: 0}", r"model.lora.r must be a positive rank"),
        ("model.lora={r: four}", r"model.lora.r: expected an integer"),
        ("model.lora={alpha: -1}", r"model.lora.alpha must be positive"),
        ("model.lora={dropout: 1.5}", r"model.lora.dropout must be in \[0, 1\)"),
        ("model.lora={target_modules: [q_prj]}", r"model.lora.target_modules: 'q_prj' .*did you mean 'q_proj'"),
        ("model.lora={target_modules: []}", r"model.lora.target_modules must name distinct modules"),
        ("model.lora=true", r"model.lora: expected a mapping"),
    ],
)
def test_lora_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_lora_config_defaults_and_refusals(monkeypatch):
    config = load_config("tiny", ["model.lora={r: 8}"])
    assert config.model.lora == {**LORA_DEFAULTS, "r": 8}  # the resolved values, as the run folder records them
    assert load_config("tiny", ["model.lora={}"]).model.lora == LORA_DEFAULTS
    assert load_config("tiny").model.lora is None
    one_key = load_config("tiny", ["model.lora.r=8", "model.lora.dropout=0"]).model.lora  # one entry at a time
    assert one_key == {**LORA_DEFAULTS, "r": 8, "dropout": 0.0}
    with pytest.raises(ConfigError, match="model.lora.rank: unknown key"):
        load_config("tiny", ["model.lora.rank=8"])
    with pytest.raises(ConfigError, match="model.lora applies to embedding and multi-vector models; model.kind=rer"):
        load_config("tiny", ["model.kind=reranker", "model.lora={}"])
    with pytest.raises(ConfigError, match=r"model\.lora .*model\.kind=sparse"):
        load_config("tiny_sparse", ["model.lora={}"])
    assert load_config("tiny_colbert", ["model.lora={}"]).model.lora == LORA_DEFAULTS  # its projection trains too
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.lora needs the peft package.*pip install embedtrain\[lora\]"):
        load_config("tiny", ["model.lora={}"])


shared_scenarios(
    __name__,
    2,
    "lora_parity.py",
    {
        "dropout": ["--grad-cache", "2", "--dropout", "0.1"],  # first: its RNG use must not reach the others
        "stage 3": ["--stage", "3"],
        "stage 2": ["--stage", "2"],
        "multi-vector": ["--multi-vector"],  # tiny_colbert with model.lora: 2 steps, export, resume
    },
)


@pytest.fixture(scope="module")
def lora_parity(scenario_launch):
    """This file's lora_parity.py scenarios (2 ranks, the session's shared launch)."""
    return scenario_launch(__name__, 2)


@pytest.mark.parametrize("stage", [3, 2])
def test_lora_gradients_match_plain_peft_and_only_the_adapter_has_optimizer_state(lora_parity, stage):
    """2 ranks (ZeRO-3: every weight partitioned, the adapter too) against one plain PyTorch step
    on the whole global batch with peft.get_peft_model; fp32."""
    result = lora_parity[f"stage {stage}"]
    assert result["max_rel_error"] < TOLERANCE, result
    assert result["init_max_diff"] == 0.0 and result["trainable"] and not result["frozen_with_grad"], result
    assert result["adapter_weights"] == 2 * 2 * 7  # A and B, 2 layers, 7 projections
    # the optimizer holds an fp32 master and two Adam moments of the adapter only, split over the ranks
    lora = result["lora_numel"]
    assert lora == tiny_shape().lora_params({"r": 4, "target_modules": LORA_DEFAULTS["target_modules"]})
    assert result["optimizer_master_numel"] == lora and result["optimizer_moment_numel"] == 2 * lora, result
    assert result["optimizer_moment_tensors"] == 2 * 2  # one flat group: exp_avg, exp_avg_sq on each rank
    assert lora < 0.06 * result["model_numel"]


def test_lora_dropout_is_live_and_grad_cache_replays_it(lora_parity):
    """With LoRA dropout, GradCache's second pass reproduces the cached embeddings exactly (RNG
    replay); the gradient then differs from the dropout-free reference, so the dropout is live."""
    result = lora_parity["dropout"]
    assert result["replay_error"] == 0.0, result
    assert result["max_rel_error"] > 1e-2, result


def test_multi_vector_lora_trains_saves_resumes_and_exports_the_projection(lora_parity):
    """tiny_colbert with model.lora, 2 steps on 2 ranks (ZeRO-3) through the training loop: the
    projection is trained with the adapter (it moved from its seeded start; the optimizer holds
    exactly the two) while every base weight stays model.path's; the checkpoint's
    trained_head.safetensors holds the trained projection, and a run resumed from it gathers the
    same adapter and projection; `embedtrain export` merges the adapter and writes the projection:
    the folder's token embeddings equal the in-process module's (relative 1e-4) and
    sentence-transformers' MultiVectorEncoder loads it with the same ones."""
    from sentence_transformers import MultiVectorEncoder as STMultiVectorEncoder

    result = lora_parity["multi-vector"]
    assert result["heads"] == ["head.linear.weight"] and result["head_saved_equal"], result
    assert result["head_moved"] > 1e-4 and result["lora_b_moved"] > 0, result
    assert result["base_max_diff"] == 0.0 and result["frozen_count"] > 0, result
    assert result["head_numel"] == 32 * 64  # dim x the tiny model's hidden size
    assert result["optimizer_master_numel"] == result["lora_numel"] + result["head_numel"], result
    assert result["resumed_keys_equal"] and result["resumed_max_diff"] == 0.0, result

    export = Path(result["export"])
    saved = torch.load(export.parent / "embeddings.pt", weights_only=False)
    theirs = STMultiVectorEncoder(str(export), device="cpu", trust_remote_code=True)
    st = {
        "queries": [t.float().numpy() for t in theirs.encode_query(saved["queries"])],
        "passages": [t.float().numpy() for t in theirs.encode_document(saved["passages"])],
    }
    for side in ("queries", "passages"):
        for got, exported, loaded in zip(saved["in_process"][side], saved["exported"][side], st[side]):
            assert got.shape == exported.shape == loaded.shape
            np.testing.assert_allclose(exported, got, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(loaded, got, rtol=1e-4, atol=1e-5)


def test_multi_vector_lora_export_refuses_adapter_only(tmp_path):
    """--adapter-only cannot carry the trained projection: refused, naming the option and the head
    (a checkpoint folder as the export reads it, no run needed)."""
    from embedtrain.export import write_export

    step = tmp_path / "checkpoints" / "step_1"
    (step / "base_model").mkdir(parents=True)
    (step / "base_model" / "multi_vector.json").write_text(json.dumps({"kind": "multi_vector"}))
    (step / "config.yaml").write_text("model: {path: x, kind: multi_vector, lora: {r: 4}}\n")
    with pytest.raises(
        CheckpointError, match=r"--adapter-only is not supported .*multi_vector: its head.linear.weight"
    ):
        write_export(step, step / "base_model", tmp_path / "out", "float32", 5.0, adapter_only=True)


def tiny_shape():
    raw = json.loads((BASE / "config.json").read_text())
    return Shape(**{key: raw[key] for key in SHAPES["llama-3.1-8b"]})


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def embed(encoder, texts):
    from embedtrain.model.encoder import load_tokenizer

    batch = load_tokenizer(BASE)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return encoder.eval()(batch["input_ids"], batch["attention_mask"])


def test_adapter_saved_under_zero3_is_the_trained_one_and_both_exports_reproduce_it(tmp_path):
    from peft import PeftModel

    from embedtrain.errors import EncodeError
    from embedtrain.inference import BiEncoder

    run_dir, memory = tmp_path / "run", tmp_path / "memory.pt"
    fast = ["--set", "train.lr=2e-3", "--set", "optim.warmup_steps=1"]  # let the adapter move visibly
    run(run_dir, tmp_path / "r.jsonl", "--steps", "4", *LORA, *fast, "--embed-out", memory, nproc=2)
    in_memory = torch.load(memory)
    step = run_dir / "checkpoints" / "step_4"

    # the adapter written at the save: every weight, gathered from the partitions, = the trained one
    saved, adapter_config = read_adapter(step)
    assert saved.keys() == {adapter_key(name) for name in in_memory["adapter"]} and len(saved) == 28
    for name, tensor in in_memory["adapter"].items():
        assert torch.equal(saved[adapter_key(name)], tensor), name
    assert all(saved[k].abs().max() > 0 for k in saved if ".lora_B." in k)  # B starts at 0: it was trained
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["peft_type"]) == (4, 8.0, "LORA")
    for name, full in zero3_full_tensors(step):  # and = the fp32 master weights resume and export read
        assert torch.equal(full["fp32"], saved[adapter_key(name)]), name
    # the DeepSpeed state leaves the frozen base out: it comes back from model.path
    states = load_checkpoint_file(rank_files(step, "model")[0])
    assert states["frozen_param_fragments"] is None
    assert all(LORA_PARAMETER.search(name) for name in states["module"])

    merged = export_checkpoint(run_dir, tmp_path / "merged")
    adapter_only = export_checkpoint(run_dir, tmp_path / "adapter", adapter_only=True)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "embedtrain.json"} <= {
        p.name for p in adapter_only.iterdir()
    }

    # merged: the released format (backbone keys of a full fine-tune), W + (alpha / r) B A
    weights, base = load_file(str(merged / "model.safetensors")), dict(BaseWeights(BASE).items())
    assert weights.keys() == base.keys()
    for name, weight in weights.items():
        module = "base_model.model." + name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in saved:
            delta = 2.0 * saved[f"{module}.lora_B.weight"] @ saved[f"{module}.lora_A.weight"]
            torch.testing.assert_close(weight, base[name] + delta, rtol=0, atol=1e-7)
            assert (weight - base[name]).abs().max() > 1e-4, name  # not the untuned base (ST issue 3246)
        else:
            assert torch.equal(weight, base[name]), name

    texts = in_memory["texts"]
    in_process = in_memory["embeddings"]
    exported = embed(BiEncoder.from_pretrained(merged, device="cpu", dtype="float32").module, texts)
    on_base = embed(Encoder(PeftModel.from_pretrained(load_backbone(BASE), adapter_only)), texts)
    from_checkpoint = embed(Encoder(PeftModel.from_pretrained(load_backbone(BASE), step)), texts)
    untuned = embed(Encoder(load_backbone(BASE)), texts)
    assert cosines(exported, in_process).min() >= 0.99999
    assert cosines(on_base, in_process).min() >= 0.99999
    assert cosines(from_checkpoint, in_process).min() >= 0.99999
    assert cosines(untuned, in_process).max() < 0.9999  # the trained adapter changes every embedding
    with pytest.raises(EncodeError, match="is a LoRA adapter without its base"):
        BiEncoder.from_pretrained(adapter_only, device="cpu")

    # a base other than the one trained on is refused, not silently merged
    other = tmp_path / "other-base"
    shutil.copytree(BASE, other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"is not the base model .*{ADAPTER_BASE}"):
        export_checkpoint(run_dir, tmp_path / "wrong", base_model=other)
    assert not (tmp_path / "wrong").exists()


def test_killed_lora_run_resumes_as_if_uninterrupted(tmp_path):
    """2 ranks, ZeRO-3, LoRA dropout on: killed (SIGKILL) after step 3, resumed from step_2 with the
    frozen base from model.path: the same examples, losses and weights as an uninterrupted run."""
    run(tmp_path / "straight", tmp_path / "straight.jsonl", "--steps", "6", *LORA, nproc=2)
    killed, records = tmp_path / "killed", tmp_path / "killed.jsonl"
    run(killed, records, "--steps", "6", "--kill-after-step", "2", *LORA, nproc=2, expect_kill=True)
    result = run(killed, records, "--steps", "6", *LORA, nproc=2)
    assert "step_2 at step 2" in result.stdout

    stream, starts = effective_stream(records)
    assert starts == [0, 2] and stream == effective_stream(tmp_path / "straight.jsonl")[0]

    def last_records(path):
        return {r["step"]: (r["loss"], r["checksum"]) for r in map(json.loads, path.read_text().splitlines())}

    resumed, straight = last_records(records), last_records(tmp_path / "straight.jsonl")
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
    a, _ = read_adapter(killed / "checkpoints" / "step_6")
    b, _ = read_adapter(tmp_path / "straight" / "checkpoints" / "step_6")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8)


def test_plan_counts_optimizer_state_for_the_adapter_only():
    """The 8B recipe with LoRA on one node: adapter parameter count from the published shape, model
    states far below full fine-tuning, gradients reduced for the adapter only, fewer FLOPs."""
    # ZeRO-3 (the recipe's `auto` picks ZeRO-2 here, whose base weights are not partitioned)
    overrides = ["model.path=unset", "data.path=unset", "deepspeed.config=zero3.json"]
    full = plan(load_config("llama_embed_nemotron_8b", overrides), "llama_embed_nemotron_8b", 1, 8)
    lora = plan(load_config("llama_embed_nemotron_8b", [*overrides, "model.lora={}"]), "llama_embed_nemotron_8b", 1, 8)
    shape = Shape(**SHAPES["llama-3.1-8b"])
    # r 16 x (in + out) per projection: q, o 4096+4096; k, v 4096+1024; gate, up, down 4096+14336; 32 layers
    assert lora["lora_params"] == 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432) == 41_943_040
    assert lora["lora_params"] == shape.lora_params(LORA_DEFAULTS)

    def option(result):
        return next(
            o for o in result["options"] if o["micro_batch"] == 2 and o["checkpointing"] and o["offload"] == "none"
        )

    assert option(lora)["parts_gib"]["model states"] * 8 * 2**30 == pytest.approx(
        2 * shape.params + 18 * lora["lora_params"]
    )
    assert option(lora)["reduce_scatter_bytes"] == 8 * lora["lora_params"] * 4  # accumulation 8, fp32 gradients
    assert option(lora)["allgather_bytes"] == 8 * 2 * (shape.params + lora["lora_params"]) * 2  # the base too
    assert option(lora)["compute_seconds"] < 0.8 * option(full)["compute_seconds"]
    assert lora["best"]["fits"]


def test_lora_parameter_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    dims = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    model = get_peft_model(LlamaModel(LlamaConfig(**dims)), LoraConfig(r=4, target_modules=lora["target_modules"]))
    assert Shape(**dims).lora_params(lora) == sum(p.numel() for p in model.parameters() if p.requires_grad)
