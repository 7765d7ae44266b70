"""The commands a user types: the tiny recipe trains and the loss falls, export loads in
transformers, and bad input stops before training with a message that names the culprit."""

import re
import shutil

import pytest
import torch
from test_training import embed_with_transformers

from conftest import embedtrain_cli
from embedtrain.model import Encoder, load_backbone

embedtrain = embedtrain_cli  # other test files import it from here


def test_tiny_recipe_trains_then_exports(tiny_trained):
    """`embedtrain train --config tiny` then `embedtrain export`, as the Quickstart runs them (the
    shared fixture runs both commands once for every test that needs a trained model)."""
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", (tiny_trained / "train.log").read_text())]
    assert len(losses) == 10
    assert losses[-1] < 0.6 * losses[0], losses  # the loss visibly falls

    again = embedtrain("export", tiny_trained / "run", tiny_trained / "model")
    assert again.returncode != 0 and "exists; pass --overwrite" in again.stderr

    texts = ["Instruct: Given a claim, retrieve documents\nQuery: Shilin Linlofo is a chemist.", "d"]
    from_transformers, _ = embed_with_transformers(tiny_trained / "model", texts)
    native = Encoder(load_backbone(tiny_trained / "model")).eval()
    from embedtrain.model.encoder import load_tokenizer

    batch = load_tokenizer(tiny_trained / "model")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            native(batch["input_ids"], batch["attention_mask"]), from_transformers, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lrr=1"], "unknown config key 'train.lrr' \\(did you mean 'lr'\\?\\)"),
        (["--set", "model.path=/nonexistent"], "model.path: /nonexistent is not a model folder"),
        (["--set", "data.path=/nonexistent"], "data.path: /nonexistent is not a folder"),
        (
            ["--set", "data.passage_max_length=16384"],
            "data.passage_max_length=16384 exceeds the model's max_position_embeddings=8192",
        ),
    ],
)
def test_bad_input_stops_before_training(tmp_path, args, message):
    """Exit 2 with the one line; a run folder made before the failure (data.path is checked after
    the folder exists) is removed with the parents the run made, and says so."""
    run_dir = tmp_path / "runs" / "new" / "run"
    run = embedtrain("train", "--config", "tiny", "--output-dir", run_dir, *args)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert re.search(message, lines[-1]) and lines[-1].startswith("embedtrain: error: "), run.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing left: no run folder, no parents
    if "data.path" in args[-1]:
        assert lines[-2] == f"embedtrain: removed {run_dir}: this run created it and failed before its first checkpoint"


def test_dataset_missing_a_column_stops_before_training(tmp_path, demo_data):
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    path = data / "SciFact" / "corpus.parquet"
    pq.write_table(pq.read_table(path).drop(["text"]), path)
    run = embedtrain("train", "--config", "tiny", "--output-dir", tmp_path / "run", "--set", f"data.path={data}")
    assert run.returncode == 2 and "SciFact" in run.stderr and "lacks column(s) text" in run.stderr


def test_a_model_of_an_unsupported_family_stops_before_training(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    run = embedtrain(
        "train", "--config", "tiny", "--output-dir", tmp_path / "run", "--set", f"model.path={tmp_path / 'bert'}"
    )
    assert run.returncode == 2
    assert "is not a checkpoint of a supported family (config.json model_type='bert'" in run.stderr


@pytest.mark.parametrize(
    "command, example", [("train", "embedtrain train --config tiny"), ("export", "embedtrain export runs/tiny")]
)
def test_help_has_examples(command, example):
    run = embedtrain(command, "--help")
    assert run.returncode == 0 and example in run.stdout


def test_prepare_command_reports_bad_rows_and_exits_nonzero(tmp_path, demo_data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    path = data / "SciFact" / "queries.parquet"
    table_rows = pq.read_table(path).to_pylist()
    table_rows[4]["pos_doc"] = []
    pq.write_table(pa.Table.from_pylist(table_rows, schema=pq.read_schema(path)), path)
    run = embedtrain("prepare", data, tmp_path / "out")
    assert run.returncode == 2 and "SciFact: " in run.stderr and "row 4: empty pos_doc" in run.stderr
    run = embedtrain("prepare", data, tmp_path / "out", "--skip-bad-rows")
    assert run.returncode == 0 and "prepared 999 queries from 3 subset(s)" in run.stdout
    assert (tmp_path / "out" / "skipped_rows.jsonl").read_text().count("\n") == 1
