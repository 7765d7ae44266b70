"""ids_only restoration and datasets named by Hub id, on a 14-subset miniature of the real dataset
(tools/make_miniature.py: 3 subsets with text, 11 ids_only with local `datasets` sources)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import REPO, worker_env
from embedtrain.data.nemotron import DataError
from embedtrain.data.prepare import prepare
from embedtrain.data.shards import PreparedDataset

spec = importlib.util.spec_from_file_location("make_miniature", REPO / "tools" / "make_miniature.py")
make_miniature = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_miniature)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: local sources are streamed from their files; a Hub source must fail fast."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniature")
    expected = make_miniature.write_miniature(root, queries=12)
    return root, expected


@pytest.fixture
def miniature_copy(tmp_path, miniature):
    shutil.copytree(miniature[0], tmp_path / "mini")
    return tmp_path / "mini"


def examples_by_id(out, hard_negatives=3):
    prepared = PreparedDataset(out)
    found = {}
    for index in range(len(prepared)):
        example = prepared.example(index, hard_negatives)
        found.setdefault(example.subset, {})[example.question_id] = [example.query, *example.passages]
    return found


def test_the_miniature_prepares_completely_and_every_text_is_its_source_row(tmp_path, miniature):
    root, expected = miniature
    manifest = prepare(root / "dataset", tmp_path / "out", sources=root / "sources")
    assert len(manifest["subsets"]) == 14
    assert examples_by_id(tmp_path / "out") == expected
    restored = {name: entry["restored_from"] for name, entry in manifest["subsets"].items() if "restored_from" in entry}
    assert sorted(restored) == sorted(make_miniature.MTEB_SUBSETS + make_miniature.COLUMN_SUBSETS)
    msmarco = restored["MSMARCO"]
    assert msmarco["repo"] == "mini/msmarco" and msmarco["location"] == str(root / "sources" / "mini" / "msmarco")
    assert [(t["config"], t["rows"], t["used"]) for t in msmarco["tables"]] == [("queries", 24, 12), ("corpus", 32, 16)]
    assert len(msmarco["fingerprint"]) == 32
    gooaq = restored["GooAQ"]
    assert [(t["config"], t["split"], t["rows"], t["used"]) for t in gooaq["tables"]] == [("pairs", "train", 32, 28)]


def test_a_rerun_skips_unchanged_subsets_and_stops_on_a_reordered_source(tmp_path, miniature_copy, capsys):
    sources, out = miniature_copy / "sources", tmp_path / "out"
    prepare(miniature_copy / "dataset", out, sources=sources)
    capsys.readouterr()
    prepare(miniature_copy / "dataset", out, sources=sources)
    assert capsys.readouterr().out.count("already prepared") == 14
    corpus = sources / "mini" / "scifact" / "corpus" / "corpus-00000.parquet"
    table = pq.read_table(corpus)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), corpus)
    with pytest.raises(DataError, match=r"SciFact: source mini/scifact changed since .* reordered or edited"):
        prepare(miniature_copy / "dataset", out, sources=sources)


def test_an_id_outside_the_source_names_subset_file_and_row(tmp_path, miniature_copy):
    queries = miniature_copy / "dataset" / "PAQ" / "queries.parquet"
    rows = pq.read_table(queries).to_pylist()
    rows[5]["question"] = "q_100000"
    pq.write_table(pq.read_table(queries).from_pylist(rows, schema=pq.read_schema(queries)), queries)
    with pytest.raises(DataError) as err:
        prepare(miniature_copy / "dataset", tmp_path / "out", sources=miniature_copy / "sources")
    assert f"PAQ: {queries} row 5: q_100000 is outside the source's 32 rows" in str(err.value)
    # with --skip-bad-rows the row is left out and listed
    manifest = prepare(
        miniature_copy / "dataset", tmp_path / "out", sources=miniature_copy / "sources", skip_bad_rows=True
    )
    assert manifest["subsets"]["PAQ"]["num_queries"] == 11
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(s["subset"], s["row"]) for s in skipped] == [("PAQ", 5)]


def test_an_empty_restored_text_and_a_malformed_id_are_errors(tmp_path, miniature_copy):
    source = miniature_copy / "sources" / "mini" / "nfcorpus" / "queries" / "queries-00000.parquet"
    queries = miniature_copy / "dataset" / "NFCorpus" / "queries.parquet"
    first = pq.read_table(queries).column("question")[0].as_py()
    table = pq.read_table(source).to_pylist()
    table[int(first[2:])]["text"] = "  "
    pq.write_table(pq.read_table(source).from_pylist(table, schema=pq.read_schema(source)), source)
    corpus = miniature_copy / "dataset" / "SQuAD" / "corpus.parquet"
    ids = pq.read_table(corpus).to_pylist()
    ids[2]["id"] = "doc-7"
    pq.write_table(pq.read_table(corpus).from_pylist(ids, schema=pq.read_schema(corpus)), corpus)
    with pytest.raises(DataError) as err:
        prepare(miniature_copy / "dataset", tmp_path / "out", sources=miniature_copy / "sources")
    assert f"NFCorpus: {queries} row 0: restored text of {first} is empty" in str(err.value)
    assert f"SQuAD: {corpus} row 2: id is not of the form d_<row>" in str(err.value)


def test_a_missing_source_config_or_source_is_named(tmp_path, miniature_copy, monkeypatch):
    # offline, as the comment below says: without it the Hub lookup waits on the network (20 s in CI)
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (miniature_copy / "dataset" / "HotpotQA" / "source_config.json").unlink()
    with pytest.raises(DataError, match=r"HotpotQA: ids_only subset without .*HotpotQA/source_config.json"):
        prepare(miniature_copy / "dataset", tmp_path / "out", sources=miniature_copy / "sources")
    # not under --sources, and offline without a cached copy: one line naming subset and source
    with pytest.raises(DataError, match=r"TriviaQA: source mini/triviaqa .* could not be loaded.*--sources"):
        prepare(miniature_copy / "dataset", tmp_path / "out2", subsets=["TriviaQA", "FEVER"])


def hub_cli(args, hf_home):
    env = {**worker_env(), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "embedtrain.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_dataset_by_name_is_read_from_the_hub_cache_offline(tmp_path, miniature):
    root, expected = miniature
    repo, sha = "nvidia/embed-nemotron-dataset-v1", "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf" / "hub" / ("datasets--" + repo.replace("/", "--"))
    shutil.copytree(root / "dataset", cache / "snapshots" / sha)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(sha)
    args = [
        "prepare",
        repo,
        tmp_path / "out",
        "--sources",
        root / "sources",
        "--subset",
        "FEVER",
        "--subset",
        "MSMARCO",
    ]
    result = hub_cli(args, tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"] == f"{repo}@{sha}"
    found = examples_by_id(tmp_path / "out")
    assert found == {name: expected[name] for name in ("FEVER", "MSMARCO")}


def test_a_dataset_by_name_without_network_or_cache_stops_with_one_line(tmp_path):
    result = hub_cli(["prepare", "nvidia/embed-nemotron-dataset-v1", tmp_path / "out"], tmp_path / "empty")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "out" / "manifest.json")
