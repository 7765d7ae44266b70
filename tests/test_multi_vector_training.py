"""Training multi-vector (ColBERT) models (model.kind=multi_vector): DeepSpeed's gradients on 2 ranks
with the `global` pool, and through GradCache, equal one plain process's on the whole global batch
(fp32, relative 1e-5; the session's shared launches); the training batches encode queries and
documents as the export does (query expansion, skiplist, either padding side, packed); tiny_colbert
trained, exported by `embedtrain export`, and loaded by sentence-transformers' MultiVectorEncoder
with scores equal to embedtrain's; the config's refusals; `plan` counts the token embeddings."""

import json
import types

import numpy as np
import pytest
import torch

from conftest import shared_scenarios
from embedtrain.config import ConfigError, load_config
from embedtrain.data.nemotron import Example
from embedtrain.inference import MultiVectorEncoder
from embedtrain.inference.multi_vector import encode_tokens
from embedtrain.kinds import kind_of
from embedtrain.kinds.multi_vector import multi_vector_settings
from embedtrain.model.encoder import load_tokenizer
from embedtrain.model.multi_vector import PUNCTUATION, MultiVectorSettings, expansion_token_id
from embedtrain.plan import plan
from embedtrain.train.engine import build_encoder
from embedtrain.train.multi_vector_loss import TokenParts

PARITY = 1e-5  # fp32 gradient parity
RELATIVE = 1e-4  # export parity with sentence-transformers

GLOBAL = ["--negatives", "global", "--multi-vector"]
SCENARIOS = {
    2: {
        "global": [*GLOBAL, "plain", "--micro", "2"],
        "expanded grad cache": [*GLOBAL, "expand", "--micro", "4", "--grad-cache", "2", "--accumulation", "2"],
        "detached": [*GLOBAL, "plain", "--micro", "2", "--detached"],
    },
    1: {"attended expansion grad cache": ["--multi-vector", "expand-attend", "--micro", "4", "--grad-cache", "1"]},
}
for _world, _scenarios in SCENARIOS.items():
    shared_scenarios(__name__, _world, "grad_parity.py", _scenarios)


@pytest.fixture(scope="module")
def parity(scenario_launch):
    return {world: scenario_launch(__name__, world) for world in SCENARIOS}


@pytest.mark.parametrize(
    "world, key",
    [(2, "global"), (2, "expanded grad cache"), (1, "attended expansion grad cache")],
)
def test_multi_vector_gradients_equal_one_plain_process(parity, world, key):
    """ZeRO-3 with the kind's collator and backward against one plain process's `local` pool over the
    whole global batch: the global pool's token embeddings gathered with gradient (packed, plain
    step), GradCache holding token embeddings with accumulation 2 and queries expanded unattended
    (padded), and GradCache with attended expansion (packed) on 1 rank."""
    result = parity[world][key]
    assert result["world"] == world and result["zero_stage"] == 3
    assert abs(result["ds_loss"] - result["ref_loss"]) <= PARITY * abs(result["ref_loss"]), result
    assert result["max_rel_error"] < PARITY, result
    assert result["replay_error"] == 0.0, result
    assert "head.linear.weight" in result["parameters"]


def test_multi_vector_parity_can_fail(parity):
    """The same run with the gather detached (other ranks' passages without gradient) is far off."""
    assert parity[2]["detached"]["max_rel_error"] > 1e-2, parity[2]["detached"]


SUBSETS = {"demo": {"query_instruction": "", "passage_instruction": ""}}
QUERIES = ["Who is Shilin Linlofo?", "a much longer query, with many words in it: truly many, many words!"]
PASSAGES = ["Shilin Linlofo is a chemist.", "Paris, the capital of France!", "x", "Berlin; Germany's capital."]


@pytest.mark.parametrize(
    "side, attend, packing", [("right", False, False), ("left", False, False), ("left", True, True)]
)
def test_training_batches_encode_as_the_export(tiny_llama, side, attend, packing):
    """The loss's token embeddings and masks (the kind's collator, TokenParts) of each query and passage
    equal what inference.encode_tokens (the export's encoding, which sentence-transformers matches:
    tests/test_multi_vector.py) gives for the same texts: expansion to data.query_max_length on the
    padding side, attended or not, and passages without punctuation."""
    overrides = [
        f"model.padding_side={side}",
        f"model.multi_vector.query_expansion={{attend: {str(attend).lower()}}}",
        f"data.packing={str(packing).lower()}",
        "data.query_max_length=20",
        "model.multi_vector.dim=16",
        "data.query_prefix=query:",
        "data.passage_prefix=passage:",
        "loss.hard_negatives=1",
    ]
    config = load_config("tiny_colbert", overrides)
    tokenizer = load_tokenizer(tiny_llama, side)
    collator = kind_of(config).make_collator(tokenizer, config, SUBSETS, False)
    examples = [Example("demo", q, PASSAGES[2 * i : 2 * i + 2]) for i, q in enumerate(QUERIES)]
    batch = collator(examples)
    module = build_encoder(config, torch.float32, checkpointing=0).eval()
    with torch.no_grad():
        tokens = TokenParts(batch, "cpu")
        queries, passages = tokens.encode(module, tokens.parts[0])
    q_mask, p_mask = tokens.masks()
    settings = multi_vector_settings(config)
    encoder = types.SimpleNamespace(
        module=module, tokenizer=tokenizer, settings=settings, expansion_id=expansion_token_id(tokenizer)
    )
    query_prompt, passage_prompt = collator.subset_prompts["demo"]
    want_queries = encode_tokens(encoder, QUERIES, query_prompt, is_query=True)
    want_passages = encode_tokens(encoder, PASSAGES, passage_prompt, is_query=False)
    for got, mask, want in [*zip(queries, q_mask, want_queries), *zip(passages, p_mask, want_passages)]:
        np.testing.assert_allclose(got[mask].numpy(), want, rtol=1e-4, atol=1e-5)
    assert all(q.shape[0] == 20 for q in want_queries)  # expanded to data.query_max_length
    assert len(want_passages[1]) < len(tokenizer(passage_prompt + PASSAGES[1])["input_ids"])  # punctuation dropped


def test_tiny_colbert_trains_exports_and_loads_in_sentence_transformers(tiny_colbert_export):
    """`embedtrain train --config tiny_colbert` (4 steps, query expansion) then `embedtrain export`:
    sentence-transformers' MultiVectorEncoder loads the folder itself, and its MaxSim scores equal
    embedtrain.MultiVectorEncoder's (relative 1e-4) with the run's settings."""
    from sentence_transformers import MultiVectorEncoder as STMultiVectorEncoder

    log = (tiny_colbert_export.parent / "train.log").read_text()
    assert "step 2: loss" in log and "step 4: loss" in log
    recorded = json.loads((tiny_colbert_export.parent / "run" / "base_model" / "multi_vector.json").read_text())
    assert recorded["kind"] == "multi_vector" and recorded["query_expansion"] == {"length": 64, "attend": True}
    ours = MultiVectorEncoder.from_pretrained(tiny_colbert_export, device="cpu")
    assert ours.settings == MultiVectorSettings(
        dim=32, query_length=64, document_length=64, query_expansion={"length": 64, "attend": True},
        skiplist_words=list(PUNCTUATION),
    )  # fmt: skip
    theirs = STMultiVectorEncoder(str(tiny_colbert_export), device="cpu", trust_remote_code=True)
    scores = ours.score(QUERIES, PASSAGES)
    st_scores = theirs.similarity(theirs.encode_query(QUERIES), theirs.encode_document(PASSAGES)).float().numpy()
    np.testing.assert_allclose(scores, st_scores, rtol=RELATIVE)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.multi_vector.dim=0"], "model.multi_vector.dim must be a positive width"),
        (["model.multi_vector.query_length=32"], "model.multi_vector.query_length: unknown key.*data.query_max_length"),
        (["model.multi_vector.skiplist=words"], "model.multi_vector.skiplist: 'words' is not one of"),
        (["model.multi_vector.query_expansion={length: 32}"], "query_expansion.length: unknown key"),
        (["model.multi_vector.query_expansion={attend: false}"], "attend=false with data.packing=true"),
        (["loss.query_negatives=true", "loss.negatives=local"], "loss.query_negatives is not supported"),
        (["loss.matryoshka_dims=[16]"], "loss.matryoshka_dims is not supported"),
        (
            ["model.kind=embedding", "model.multi_vector.dim=64"],
            "model.multi_vector applies to model.kind=multi_vector",
        ),
    ],
)
def test_config_refusals_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_colbert", overrides)


def test_plan_counts_the_token_embeddings():
    """`embedtrain plan` of the 1B ColBERT recipe: the micro-batch's token embeddings (every sequence
    at the longer max length x dim fp32, and their gradient) and, under global, the gathered pool of
    every rank's passages at the passage length."""
    config = load_config("llama3_2_1b_colbert", ["model.path=unset", "data.path=unset"])
    result = plan(config, "llama3_2_1b_colbert", 1, 8)
    option = next(o for o in result["options"] if o["micro_batch"] == 4 and o["offload"] == "none")
    micro, group, gpus, width, dim = 4, 5, 8, 300, 128
    local = micro * (1 + group) * width * dim * 4 * 2
    gathered = gpus * micro * group * width * dim * 4 * 2
    assert option["parts_gib"]["embedding pool"] * 2**30 == pytest.approx(local + gathered)
    assert option["parts_gib"]["MaxSim scores"] > 0
    dense = plan(load_config("llama3_2_1b", ["model.path=unset", "data.path=unset"]), "llama3_2_1b", 1, 8)
    assert "MaxSim scores" not in dense["options"][0]["parts_gib"]


def test_training_starts_from_an_exported_multi_vector_model(tiny_colbert_export):
    """model.path may be a multi-vector export: the module built for training encodes as the export
    (its projection loaded, not drawn anew); a model.multi_vector.dim that differs is refused."""
    config = load_config("tiny_colbert", [f"model.path={tiny_colbert_export}"])
    module = build_encoder(config, torch.float32, checkpointing=0).eval()
    exported = MultiVectorEncoder.from_pretrained(tiny_colbert_export, device="cpu")
    encoder = types.SimpleNamespace(module=module, tokenizer=exported.tokenizer, settings=exported.settings)
    encoder.expansion_id = exported.expansion_id
    for got, want in zip(encode_tokens(encoder, PASSAGES), exported.encode(PASSAGES, is_query=False)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="set model.multi_vector.dim=32"):
        wrong = load_config("tiny_colbert", [f"model.path={tiny_colbert_export}", "model.multi_vector.dim=16"])
        build_encoder(wrong, torch.float32, checkpointing=0)
