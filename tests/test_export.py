"""Export and interop: the exported folder works in transformers (5.x and 4.51) and
sentence-transformers exactly as `embedtrain encode`, can be trained further, and bad checkpoints
fail with messages that name the file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import embedtrain
from transformers import AutoModel, AutoTokenizer

from conftest import REPO, worker_env
from embedtrain.export import export_checkpoint
from embedtrain.model.encoder import attention_is_bidirectional
from embedtrain.train.checkpoint import CheckpointError, load_checkpoint_file

QUERIES = ["Shilin Linlofo is a chemist.", "Which material did Dorbra Ostmorven use?"]
DOCUMENTS = [
    "Dorbra Ostmorven (born 1948 in Bergen) is an architect best known for works made of copper.",
    "A short one.",
]
TF451 = Path(os.environ.get("EMBEDTRAIN_TF451", Path.home() / ".cache" / "embedtrain" / "transformers-4.51.3"))
# transformers 4.51 and the packages it needs that the current environment lacks (huggingface_hub
# 1.x dropped requests); everything else (numpy, safetensors, regex, ...) comes from the environment.
TF451_PACKAGES = [
    "transformers==4.51.3",
    "tokenizers==0.21.1",
    "huggingface_hub==0.30.2",
    "requests",
    "urllib3",
    "idna",
    "charset-normalizer",
    "certifi",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run = embedtrain(
        "train",
        "--config",
        "tiny",
        "--output-dir",
        root / "run",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.save_every=2",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    exported = embedtrain("export", root / "run", root / "model")
    assert exported.returncode == 0, exported.stderr[-3000:]
    return root


def encode_cli(model, texts, tmp_path, name, *args):
    (tmp_path / f"{name}.txt").write_text("\n".join(texts) + "\n")
    run = embedtrain("encode", model, "--input", tmp_path / f"{name}.txt", "--output", tmp_path / f"{name}.npy", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(tmp_path / f"{name}.npy")


def cosines(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_folder_has_the_released_layout(trained):
    model = trained / "model"
    for name in (
        "config.json",
        "model.safetensors",
        "llama_bidirectional_model.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "README.md",
    ):
        assert (model / name).is_file(), name
    st = json.loads((model / "config_sentence_transformers.json").read_text())
    assert st["similarity_fn_name"] == "cosine"
    assert st["prompts"] == {
        "query": "Instruct: Given a claim, retrieve documents that support or refute the claim\nQuery: ",
        "document": "",
    }
    pooling = json.loads((model / "1_Pooling" / "config.json").read_text())
    assert (
        pooling["pooling_mode_mean_tokens"] and pooling["include_prompt"] and pooling["word_embedding_dimension"] == 64
    )
    assert "4 steps" in (model / "README.md").read_text()


def test_sentence_transformers_and_transformers_reproduce_encode(trained, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = trained / "model"
    queries = encode_cli(model, QUERIES, tmp_path, "q", "--prompt", "query")
    documents = encode_cli(model, DOCUMENTS, tmp_path, "d", "--prompt", "document")
    st = SentenceTransformer(str(model), trust_remote_code=True, device="cpu")
    assert cosines(st.encode(QUERIES, prompt_name="query"), queries).min() >= 0.99999
    assert cosines(st.encode(DOCUMENTS, prompt_name="document"), documents).min() >= 0.99999

    hf = AutoModel.from_pretrained(model, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=True)
    prompt = json.loads((model / "config_sentence_transformers.json").read_text())["prompts"]["query"]
    batch = tokenizer([prompt + q for q in QUERIES], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    assert cosines(mean, queries).min() >= 0.99999
    assert attention_is_bidirectional(hf)


def test_matryoshka_truncation_in_encode(trained, tmp_path):
    full = encode_cli(trained / "model", QUERIES, tmp_path, "full")
    short = encode_cli(trained / "model", QUERIES, tmp_path, "short", "--dim", "16")
    assert short.shape == (2, 16)
    np.testing.assert_allclose(short, full[:, :16] / np.linalg.norm(full[:, :16], axis=-1, keepdims=True), atol=1e-6)


def test_bidirectional_and_equal_under_transformers_4_51(trained, tmp_path):
    """The shipped modeling file on an older transformers (4.51, its own environment)."""
    marker = TF451 / "embedtrain-installed.txt"
    if not marker.is_file() or marker.read_text() != " ".join(TF451_PACKAGES):
        shutil.rmtree(TF451, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(TF451), "--no-deps", *TF451_PACKAGES],
            check=True,
            timeout=600,
        )
        marker.write_text(" ".join(TF451_PACKAGES))
    expected = encode_cli(trained / "model", DOCUMENTS, tmp_path, "docs")
    script = REPO / "tests" / "workers" / "old_transformers.py"
    env = worker_env()
    env["PYTHONPATH"] = str(TF451)  # the old transformers only; embedtrain is not importable there
    run = subprocess.run(
        [sys.executable, str(script), str(trained / "model"), *DOCUMENTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["transformers"] == "4.51.3" and result["bidirectional"]
    assert cosines(np.array(result["embeddings"]), expected).min() >= 0.99999


def test_exported_folder_trains_further(trained, tmp_path):
    run = embedtrain(
        "train",
        "--config",
        "tiny",
        "--output-dir",
        tmp_path / "again",
        "--set",
        "train.max_steps=2",
        "--set",
        f"model.path={trained / 'model'}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "again" / "checkpoints" / "step_2").is_dir()


def test_sharded_export_equals_single_file(trained, tmp_path):
    from safetensors.torch import load_file

    old_umask = os.umask(0o022)
    try:
        sharded = export_checkpoint(trained / "run", tmp_path / "sharded", max_shard_gb=0.0002)
    finally:
        os.umask(old_umask)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    # the user's umask, not safetensors' 0600: others on a shared cluster can read the export
    modes = {path: path.stat().st_mode & 0o777 for path in [sharded, *sharded.rglob("*")]}
    assert modes == {path: 0o755 if path.is_dir() else 0o644 for path in modes}
    merged = {k: v for f in files for k, v in load_file(str(sharded / f)).items()}
    single = load_file(str(trained / "model" / "model.safetensors"))
    assert merged.keys() == single.keys()
    for key in single:
        assert torch.equal(merged[key], single[key])
    hf = AutoModel.from_pretrained(sharded, trust_remote_code=True)
    assert hf.embed_tokens.weight.shape[0] == 1024


def test_partial_and_corrupt_checkpoints_fail_clearly(trained, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(trained / "run", broken)
    step = broken / "checkpoints" / "step_4"
    (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="step_4 is incomplete or damaged: .*optim_states.pt is missing"):
        export_checkpoint(broken, tmp_path / "out")
    model_states = step / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:100])
    (step / "complete.json").unlink()  # an unlisted, corrupt file: the loader itself names it
    with pytest.raises(CheckpointError, match="no complete.json"):
        export_checkpoint(broken, tmp_path / "out")
    with pytest.raises(CheckpointError, match="cannot read checkpoint file .*step_4/zero_pp_rank_0_mp_rank_00_model"):
        load_checkpoint_file(model_states)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    run = embedtrain("export", broken, tmp_path / "out2")
    assert run.returncode == 2 and "incomplete or damaged" in run.stderr
    run = embedtrain("export", tmp_path, tmp_path / "out3")
    assert run.returncode == 2 and "is not a run folder" in run.stderr


def test_encode_cli_long_documents_and_token_budget(trained, tmp_path):
    """--max-tokens changes only the batching; --long-documents chunk changes only over-long texts;
    a --max-length beyond the model's positions is refused."""
    texts = DOCUMENTS + [" ".join(DOCUMENTS * 20)]
    plain = encode_cli(trained / "model", texts, tmp_path, "plain", "--prompt", "document", "--max-length", "32")
    budget = encode_cli(
        trained / "model", texts, tmp_path, "budget", "--prompt", "document", "--max-length", "32", "--max-tokens", "64"
    )
    np.testing.assert_allclose(budget, plain, atol=1e-5)
    chunked = encode_cli(
        trained / "model",
        texts,
        tmp_path,
        "chunked",
        "--prompt",
        "document",
        "--max-length",
        "32",
        "--long-documents",
        "chunk",
        "--chunk-overlap",
        "4",
    )
    np.testing.assert_allclose(chunked[1], plain[1], atol=1e-5)  # "A short one." fits in 32 tokens
    assert np.abs(chunked[2] - plain[2]).max() > 1e-3
    refused = embedtrain(
        "encode",
        trained / "model",
        "--input",
        tmp_path / "plain.txt",
        "--output",
        tmp_path / "x.npy",
        "--max-length",
        "100000",
    )
    assert refused.returncode != 0 and "exceeds" in refused.stderr and "max_position_embeddings" in refused.stderr
