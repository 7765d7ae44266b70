"""An exported reranker scores the same in embedtrain (Reranker.score, `embedtrain rerank`),
transformers (AutoModelForSequenceClassification; 5.x and 4.51) and sentence-transformers'
CrossEncoder, with right and left padding; and a model of the other kind is refused by name."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_export import TF451, TF451_PACKAGES

from conftest import REPO, embedtrain_cli, worker_env
from embedtrain import BiEncoder, Reranker
from embedtrain.errors import EncodeError
from embedtrain.rerank import read_pairs

QUERIES = ["Which material did Dorbra Ostmorven use?", "Who is Shilin Linlofo?"]
PASSAGES = [
    "Dorbra Ostmorven (born 1948 in Bergen) is an architect best known for works made of copper.",
    "A short one.",
    "Shilin Linlofo is a chemist. " * 30,  # over the recipe's data.pair_max_length (128 tokens): truncated
]
PAIRS = [(query, passage) for query in QUERIES for passage in PASSAGES]
TOLERANCE = 1e-4  # absolute, fp32; a wrong template or padding moves these scores by ~1e-2


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    """tiny_reranker trained 2 steps and exported; its scores of PAIRS by embedtrain (fp32)."""
    root = tmp_path_factory.mktemp("reranker_export")
    train = ("train", "--config", "tiny_reranker", "--output-dir", root / "run", "--set", "train.max_steps=2")
    for args in (train, ("export", root / "run", root / "model")):
        result = embedtrain_cli(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    model = Reranker.from_pretrained(root / "model", device="cpu", dtype="float32")
    scores = np.concatenate([model.score(query, PASSAGES, batch_size=2) for query in QUERIES])
    assert np.ptp(scores) > 5e-3  # the pairs score apart: the tolerance can tell a wrong rendering
    return root / "model", scores


def pair_texts(model_dir):
    metadata = json.loads((model_dir / "embedtrain.json").read_text())
    return [metadata["pair_template"].format(query=q, passage=p) for q, p in PAIRS], metadata["pair_max_length"]


def test_export_carries_the_cross_encoder_files_and_card(reranker):
    model_dir, _ = reranker
    config = json.loads((model_dir / "config.json").read_text())
    assert config["sentence_transformers"]["activation_fn"] == "torch.nn.modules.linear.Identity"
    st = json.loads((model_dir / "config_sentence_transformers.json").read_text())
    assert (
        st["model_type"] == "CrossEncoder" and st["activation_fn"] == config["sentence_transformers"]["activation_fn"]
    )
    module = json.loads((model_dir / "sentence_bert_config.json").read_text())
    assert module["transformer_task"] == "sequence-classification" and module["max_seq_length"] == 128
    assert module["modality_config"]["message"]["format"] == "flat"
    assert json.loads((model_dir / "modules.json").read_text())[0]["path"] == ""
    card = (model_dir / "README.md").read_text()
    assert "2 steps" in card and "question:{query}" in card and "CrossEncoder" in card and "1_Pooling" not in card
    assert not (model_dir / "1_Pooling").exists()


def test_cross_encoder_and_transformers_reproduce_score(reranker):
    """fp32, batches of unequal lengths (one pair truncated), right and left padding."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir, expected = reranker
    texts, max_length = pair_texts(model_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cross_encoder = CrossEncoder(str(model_dir), trust_remote_code=True, device="cpu")
    assert isinstance(cross_encoder.activation_fn, torch.nn.Identity) and cross_encoder.max_seq_length == max_length
    for side in ("right", "left"):
        tokenizer.padding_side = cross_encoder.tokenizer.padding_side = side
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        assert (batch["attention_mask"][:, 0 if side == "left" else -1] == 0).any()
        with torch.no_grad():
            logits = hf.eval()(**batch).logits[:, 0].numpy()
        np.testing.assert_allclose(logits, expected, rtol=0, atol=TOLERANCE, err_msg=f"transformers, {side} padding")
        features = cross_encoder[0].preprocess(PAIRS)
        assert features["input_ids"].shape[1] == max_length  # the long pair is cut where embedtrain cuts it
        assert (features["attention_mask"][:, 0 if side == "left" else -1] == 0).any()
        predicted = cross_encoder.predict(PAIRS, batch_size=4)  # default activation: the logits as they are
        np.testing.assert_allclose(predicted, expected, rtol=0, atol=TOLERANCE, err_msg=f"CrossEncoder, {side}")
        identity = cross_encoder.predict(PAIRS, batch_size=3, activation_fn=torch.nn.Identity())
        np.testing.assert_allclose(identity, expected, rtol=0, atol=TOLERANCE)
    ranked = cross_encoder.rank(QUERIES[0], PASSAGES)
    assert [r["corpus_id"] for r in ranked] == [int(i) for i in np.argsort(-expected[: len(PASSAGES)])]
    with pytest.raises(Exception, match=r"scores \(query, passage\) pairs"):  # the template takes no prompt
        cross_encoder.predict(PAIRS[:1], prompt="query: ")


def installed_transformers_4_51():
    """The cached transformers 4.51 environment of test_export, installed when missing; skip when
    it cannot be (no network)."""
    marker = TF451 / "embedtrain-installed.txt"
    if marker.is_file() and marker.read_text() == " ".join(TF451_PACKAGES):
        return TF451
    command = [sys.executable, "-m", "pip", "install", "-q", "--target", str(TF451), "--no-deps", *TF451_PACKAGES]
    try:
        subprocess.run(command, check=True, timeout=600, capture_output=True, text=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        why = (err.stderr or "")[-1000:] if isinstance(err.stderr, str) else ""
        pytest.skip(f"transformers 4.51 is not cached in {TF451} and cannot be installed: {err}\n{why}")
    marker.write_text(" ".join(TF451_PACKAGES))
    return TF451


def test_equal_under_transformers_4_51(reranker):
    """The shipped modeling file and chat template on transformers 4.51 (its own environment)."""
    model_dir, expected = reranker
    env = worker_env()
    env["PYTHONPATH"] = str(installed_transformers_4_51())  # the old transformers only, no embedtrain
    strings = [text for pair in PAIRS for text in pair]
    script = REPO / "tests" / "workers" / "old_transformers.py"
    run = subprocess.run(
        [sys.executable, str(script), "--reranker", str(model_dir), *strings],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["transformers"] == "4.51.3" and result["bidirectional"] and result["chat_template_tokens_equal"]
    for side in ("right", "left"):
        np.testing.assert_allclose(result["logits"][side], expected, rtol=0, atol=TOLERANCE, err_msg=side)


def test_rerank_cli_matches_score_in_both_input_forms(reranker, tmp_path):
    model_dir, expected = reranker
    lines = [{"query": QUERIES[0], "passages": PASSAGES}, {"query": QUERIES[1], "passage": PASSAGES[2]}]
    lines += [{"query": QUERIES[1], "passages": []}, {"query": QUERIES[1], "passage": PASSAGES[0]}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = embedtrain_cli(
        "rerank", model_dir, "--input", tmp_path / "pairs.jsonl", "--output", tmp_path / "s.jsonl", "--batch-size", "2"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote the scores of 5 pairs (4 lines)" in run.stdout
    out = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [sorted(record) for record in out] == [["scores"], ["score"], ["scores"], ["score"]]
    np.testing.assert_allclose(out[0]["scores"], expected[:3], rtol=0, atol=1e-5)
    np.testing.assert_allclose([out[1]["score"], out[3]["score"]], expected[[5, 3]], rtol=0, atol=1e-5)
    assert out[2]["scores"] == []

    (tmp_path / "bad.jsonl").write_text(
        json.dumps(lines[0]) + "\n" + json.dumps({"query": "q", "passages": "p"}) + "\n"
    )
    refused = embedtrain_cli("rerank", model_dir, "--input", tmp_path / "bad.jsonl", "--output", tmp_path / "x.jsonl")
    assert refused.returncode == 2 and f'{tmp_path / "bad.jsonl"} line 2: "passages" is str' in refused.stderr
    assert not (tmp_path / "x.jsonl").exists()  # refused before the model loads


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: not JSON"),
        ('{"passage": "p"}', 'line 2: expected an object with a string "query"'),
        ('{"query": "q", "passage": "p", "passages": ["p"]}', "line 2: .*it has both"),
        ('{"query": "q"}', "line 2: .*it has neither"),
        ('{"query": "q", "passages": ["p", 3]}', r'line 2: "passages"\[1\] is int'),
        ('["q", "p"]', "line 2: expected an object"),
    ],
)
def test_bad_pair_lines_are_named(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q", "passage": "p"}\n' + line + "\n")
    with pytest.raises(EncodeError, match=f"{path}.*{message}"):
        read_pairs(path)


def test_each_kind_refuses_the_other(reranker, tiny_export, tmp_path):
    model_dir, _ = reranker
    with pytest.raises(EncodeError, match=r"is a reranker \(cross-encoder\).*Reranker.from_pretrained"):
        BiEncoder.from_pretrained(model_dir)
    with pytest.raises(EncodeError, match=r"is an embedding model \(bi-encoder\).*BiEncoder.from_pretrained"):
        Reranker.from_pretrained(tiny_export)
    (tmp_path / "texts.txt").write_text("a text\n")
    run = embedtrain_cli("encode", model_dir, "--input", tmp_path / "texts.txt", "--output", tmp_path / "e.npy")
    assert run.returncode == 2 and "is a reranker (cross-encoder)" in run.stderr and "embedtrain rerank" in run.stderr


@pytest.mark.parametrize(
    "template",
    ["{passage} || {query}", 'Q: "{query}"\\ {{not a field}} #}} {{% raw %}}\n\tP: {passage} «{query}»\n'],
    ids=["reordered", "escapes"],
)
def test_other_pair_templates_render_as_embedtrain_tokenizes(reranker, tmp_path, template):
    """Any data.pair_template a run may use becomes a chat template with exactly embedtrain's tokens;
    a format spec, which a chat template cannot apply, is refused by name."""
    from embedtrain.export import CHAT_TEMPLATE_FILE, check_pair_rendering, pair_chat_template
    from embedtrain.train.checkpoint import CheckpointError

    model_dir, _ = reranker
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    (folder / CHAT_TEMPLATE_FILE).write_text(pair_chat_template(template, "<|begin_of_text|>"))
    check_pair_rendering(folder, template)
    (folder / CHAT_TEMPLATE_FILE).write_text(pair_chat_template(template))  # without the special prefix
    with pytest.raises(CheckpointError, match="whose tokens differ from embedtrain's"):
        check_pair_rendering(folder, template)
    with pytest.raises(CheckpointError, match="conversion or format spec"):
        pair_chat_template(template.replace("{passage}", "{passage!r}"))
