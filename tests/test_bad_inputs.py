"""Bad data inputs (issue 28, item 7): a truncated or damaged parquet file, BEIR data without
negatives, bad rows of every input format, an empty file to encode, a teacher cache built on other
data, and `assets:` paths. Each bad input gets one line that says what is wrong, where (file, line,
key) and the fix, exit code 2, and leaves no output behind; the inputs that used to be refused
wrongly (mine on BEIR, assets: paths) now work.

Commands run in-process through click's CliRunner (no interpreter start; `fail` ends a process with
os._exit, so `shutdown` is swapped for a SystemExit that CliRunner records as the exit code), except
`train`, which makes a process group and so runs as a user types it (conftest.embedtrain_cli)."""

import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_formats import SUBSET, write_beir, write_corpus_json, write_jsonl

from conftest import ASSETS, embedtrain_cli
from embedtrain.data.teacher import TeacherCache, embeddings_file, hashes_file
from embedtrain.errors import DataError

DEMO = ASSETS / "demo-data"
CORRUPT = r"{file}: not a readable parquet file, it is truncated or corrupt \(.+\); replace it with a complete copy"


def error_line(output):
    """The one `embedtrain: error:` line of a failed command (no traceback before it)."""
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("embedtrain: error: ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0][len("embedtrain: error: ") :]


def damaged_copy(tmp_path, how):
    """The demo data with FEVER/queries.parquet (the first file read) cut in half (its footer gone)
    or with its data pages zeroed (footer intact: the damage shows only when a page is decoded)."""
    data = tmp_path / "data"
    shutil.copytree(DEMO, data)
    path = data / "FEVER" / "queries.parquet"
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[100 : len(raw) // 2] = bytes(len(raw) // 2 - 100)
    path.write_bytes(bytes(raw))
    return data, path


@pytest.mark.parametrize(
    "command, how",
    [
        pytest.param("prepare", "truncated", id="prepare-truncated"),
        pytest.param("prepare", "damaged", id="prepare-damaged"),
        pytest.param("eval", "truncated", id="eval-truncated"),
    ],
)
def test_corrupt_parquet_is_one_line_naming_the_file(run_cli, tiny_export, tmp_path, command, how):
    data, path = damaged_copy(tmp_path, how)
    out = tmp_path / ("out" if command == "prepare" else "metrics.json")
    if command == "prepare":
        code, output = run_cli("prepare", data, out)
    else:
        code, output = run_cli("eval", tiny_export, data, "--output", out)
    assert code == 2, output[-3000:]
    assert re.fullmatch(CORRUPT.format(file=re.escape(str(path))) + ".*", error_line(output))
    assert not out.exists()  # nothing half-written: prepare removes the folder it made


def test_train_on_raw_data_with_a_truncated_file(tmp_path):
    """`train` prepares raw data in open_dataset (the same prepare as the command, run in-process
    here: the command's exit is the row above); nothing is left in the run folder."""
    from embedtrain.config import load_config
    from embedtrain.train.loop import open_dataset

    data, path = damaged_copy(tmp_path, "truncated")
    config = load_config("tiny", [f"data.path={data}"], tmp_path / "run")
    with pytest.raises(DataError) as err:
        open_dataset(config.data, tmp_path / "run")
    assert re.fullmatch(CORRUPT.format(file=re.escape(str(path))) + ".*", str(err.value))
    assert not (tmp_path / "run" / "prepared").exists()


def test_train_on_beir_data_without_negatives_stops_before_the_engine(tmp_path):
    """`train` on prepared BEIR data (no negatives) with loss.hard_negatives=3: one line naming the
    mine command for its source, exit 2, before DeepSpeed starts, and no checkpoint."""
    beir = write_beir(tmp_path / "beir")
    prepared = tmp_path / "beir-prepared"
    from embedtrain.data.prepare import prepare

    prepare(beir, prepared)
    run = tmp_path / "run"
    result = embedtrain_cli("train", "--config", "tiny", "--output-dir", run, "--set", f"data.path={prepared}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result.stderr) == (
        f"{prepared}: this data has no negatives ({SUBSET}: 12 of 12 queries (first 'q_0') have no neg_doc) but "
        f"loss.hard_negatives=3: mine them with `embedtrain mine MODEL {beir.resolve()} MINED` (MODEL: an exported "
        "embedding model) and train on data.path=MINED, or set loss.hard_negatives=0 with loss.negatives=local or "
        "global"
    )
    assert "DeepSpeed info" not in result.stderr
    assert not (run / "checkpoints").exists()


def test_mine_accepts_beir_and_its_output_trains(run_cli, tiny_export, tmp_path):
    """The docs' route to negatives for BEIR data: `mine` takes the BEIR folder (as prepare does) and
    writes the dataset layout with ranked neg_doc, which prepares with negatives for every query. A
    prepared folder is refused with the source to mine instead."""
    beir = write_beir(tmp_path / "beir")
    out = tmp_path / "mined"
    code, output = run_cli("mine", tiny_export, beir, out, "--top-k", "3")
    assert code == 0, output[-3000:]
    queries = pq.read_table(out / SUBSET / "queries.parquet").to_pylist()
    counts = [len(q["neg_doc"]) for q in queries]
    assert len(queries) == 12 and sum(counts) > 0 and max(counts) <= 3, counts  # some fall to the 0.95 margin
    assert all(not {d["id"] for d in q["neg_doc"]} & {d["id"] for d in q["pos_doc"]} for q in queries)
    assert sorted(p.name for p in out.iterdir()) == [SUBSET]  # the converted copy went with the work folder
    from embedtrain.data.prepare import prepare
    from embedtrain.data.shards import PreparedDataset

    prepare(out, tmp_path / "prepared")
    without = PreparedDataset(tmp_path / "prepared").without_negatives(SUBSET)[0]
    assert without == counts.count(0)  # the set-up check counts what mine left without negatives

    code, output = run_cli("mine", tiny_export, tmp_path / "prepared", tmp_path / "again")
    assert code == 2
    assert re.fullmatch(
        rf"DATA {tmp_path / 'prepared'} is a prepared folder \(manifest.json\); mine reads the source it was "
        rf"prepared from: `embedtrain mine MODEL {out.resolve()} OUT`",
        error_line(output),
    )
    assert not (tmp_path / "again").exists()


def bad_jsonl(root):
    """12 good records, then 3 bad lines (14-16: not JSON, no pos_doc, not an object)."""
    src = write_jsonl(root)
    with open(src / f"{SUBSET}.jsonl", "a") as f:
        f.write('{"query": "cut off\n' + json.dumps({"query": "no positive"}) + "\n[1, 2]\n")
    path = src / f"{SUBSET}.jsonl"
    return src, 12, [f"{path} line 14: not a valid JSON line", f"{path} line 15: no pos_doc", f"{path} line 16"]


def bad_beir(root):
    """A duplicate corpus _id, a queries line that is not JSON and a qrels line naming no document."""
    src = write_beir(root)
    with open(src / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "d_0", "text": "a second d_0"}) + "\n")
    with open(src / "queries.jsonl", "a") as f:
        f.write("not json\n")
    with open(src / "qrels" / "train.tsv", "a") as f:
        f.write("q_0\td_404\t1\n")
    return (
        src,
        12,
        [
            f"{src / 'corpus.jsonl'} line 31: duplicate _id 'd_0'",
            f"{src / 'queries.jsonl'} line 14: not a valid JSON line",
            f"{src / 'qrels' / 'train.tsv'} line 19: corpus-id 'd_404' is not in corpus.jsonl",
        ],
    )


def bad_corpus_json(root):
    """Records 3, 5 and 7 of 12: an unknown corpus_id, no question, not an object."""
    src = write_corpus_json(root)
    document = json.loads((src / "train.json").read_text())
    document["data"][3]["corpus_id"] = "Other"
    del document["data"][5]["question"]
    document["data"][7] = "a string"
    (src / "train.json").write_text(json.dumps(document))
    path = src / "train.json"
    return src, 9, [f"{path}: data[3]: corpus_id 'Other'", f"{path}: data[5]: no question", f"{path}: data[7]"]


@pytest.mark.parametrize("make", [bad_jsonl, bad_beir, bad_corpus_json], ids=["jsonl", "beir", "corpus-json"])
def test_bad_rows_of_every_format_are_all_counted_and_skippable(run_cli, tmp_path, make):
    src, good, expected = make(tmp_path / "src")
    out = tmp_path / "out"
    code, output = run_cli("prepare", src, out)
    assert code == 2, output[-3000:]
    line = error_line(output)
    assert line.startswith("3 bad row(s): ") and line.endswith(
        f"Fix them, or pass --skip-bad-rows to leave them out (each is then listed in {out / 'skipped_rows.jsonl'})"
    )
    positions = [line.index(text) for text in expected]
    assert positions == sorted(positions), line  # all three, in file order
    assert not out.exists()

    code, output = run_cli("prepare", src, out, "--skip-bad-rows")
    assert code == 0, output[-3000:]
    skipped = [json.loads(row) for row in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert len(skipped) == 3 and {row["subset"] for row in skipped} == {SUBSET}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["subsets"][SUBSET]["num_queries"] == good
    assert manifest["subsets"][SUBSET]["skipped_rows"] == 3


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_encode_refuses_an_empty_file(run_cli, tiny_export, tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_text("")
    code, output = run_cli("encode", tiny_export, "--input", empty, "--output", tmp_path / "e.npy")
    assert code == 2
    assert error_line(output) == (
        f"--input {empty}: the file is empty, there is nothing to embed; give one text per line (.txt) or one "
        '{"text": ...} object per line (.jsonl)'
    )
    assert not (tmp_path / "e.npy").exists()


def fake_cache(folder, data):
    """A teacher cache of one query and one passage (4 dims), recorded as built from `data`."""
    from embedtrain.data.nemotron import content_hash
    from embedtrain.data.teacher import CACHE_FORMAT, METADATA

    folder.mkdir()
    for side, text in (("query", "a query"), ("passage", "a passage")):
        np.save(folder / hashes_file(side), np.array([content_hash(text)], np.int64))
        np.save(folder / embeddings_file(side), np.ones((1, 4), np.float16))
    metadata = {
        "format": CACHE_FORMAT,
        "teacher": "/models/teacher",
        "teacher_dim": 4,
        "cache_dtype": "float16",
        "counts": {"query": 1, "passage": 1},
        "data": str(data),
        "subsets": ["Old"],
    }
    (folder / METADATA).write_text(json.dumps(metadata))
    return folder


def test_teacher_cache_of_other_data_names_the_training_data(tmp_path):
    """The rebuild hint builds the cache for the data being trained on (data.path, data.subsets), not
    again for the data it was built from; the training loop passes them (open_teacher)."""
    from embedtrain.config import load_config
    from embedtrain.train.loop import open_teacher

    cache = fake_cache(tmp_path / "cache", "/data/old")
    config = load_config(
        "tiny",
        [f"loss.distill={{teacher_cache: {cache}}}", "data.path=/data/new", "data.subsets=[FEVER, SciFact]"],
    )
    teacher = open_teacher(config.loss.distill, config.data)
    with pytest.raises(DataError) as err:
        teacher.lookup(["a query", "another query"], "query")
    assert str(err.value).endswith(
        "the cache was built for other data or subsets (/data/old); build it for this data with `embedtrain encode "
        f"/models/teacher --teacher-cache /data/new --subsets FEVER,SciFact --cache-dtype float16 --output {cache}`"
    )
    assert "\n" not in str(err.value)
    import pickle

    assert pickle.loads(pickle.dumps(teacher)).data == ("/data/new", ["FEVER", "SciFact"])  # DataLoader workers


def test_assets_paths_resolve_for_teacher_cache_and_plan(run_cli, tiny_export, tmp_path):
    """`encode --teacher-cache assets:demo-data` and `plan --config tiny` (model.path
    assets:tiny-llama) resolve the shipped folders as a recipe's paths are resolved."""
    code, output = run_cli(
        "encode",
        tiny_export,
        "--teacher-cache",
        "assets:demo-data",
        "--subsets",
        "SyntheticClassificationData",
        "--output",
        tmp_path / "cache",
    )
    assert code == 0, output[-3000:]
    assert TeacherCache(tmp_path / "cache").metadata["data"] == str(DEMO.resolve())

    code, output = run_cli("plan", "--config", "tiny", "--gpus-per-node", "1")
    assert code == 0, output[-3000:]
    assert output.startswith("model: 0.00B parameters (2 layers, hidden 64, 4 query / 2 KV heads of 16)"), output
