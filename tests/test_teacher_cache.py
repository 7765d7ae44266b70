"""The teacher-embedding cache (embedtrain.teacher_cache writes it, `embedtrain encode --teacher-cache`;
embedtrain.data.teacher reads it): its rows equal the teacher's own encode of each text with the
teacher's prompts for the subset, it holds exactly the distinct texts of each side, missing texts and
foreign folders are errors that say what to do, the command line builds it and refuses the
plain-encode options, a killed build leaves nothing that looks complete, and it pickles cheaply into
DataLoader workers."""

import json
import pickle
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import embedtrain_cli
from embedtrain.data.nemotron import DataError
from embedtrain.data.teacher import CACHE_FORMAT, TeacherCache
from embedtrain.teacher_cache import write_teacher_cache

SUBSET = "FEVER"
PREFIXES = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("teacher_cache")


@pytest.fixture(scope="module")
def prefix_teacher(tiny_export, root):
    """The tiny export recorded as a prefix-trained model ("query: " / "passage: " for every subset)."""
    folder = root / "prefix-teacher"
    shutil.copytree(tiny_export, folder)
    policy = {"prompt_source": "prefix", "query_prefix": "query:", "passage_prefix": "passage:"}
    policy.update(default_query=PREFIXES["query"], default_document=PREFIXES["passage"])
    (folder / "embedtrain.json").write_text(json.dumps(policy))
    return folder


@pytest.fixture(scope="module")
def prepared(demo_data, root):
    """FEVER and SciFact prepared: the caches below take FEVER only."""
    from embedtrain.data.prepare import prepare

    prepare(demo_data, root / "prepared", ["FEVER", "SciFact"], workers=1)
    return root / "prepared"


@pytest.fixture(scope="module")
def cache32(tiny_export, demo_data, root):
    """float32 cache of the instruction-trained export over the raw demo folder (prepared on the way)."""
    write_teacher_cache(
        tiny_export, demo_data, root / "cache32", subsets=[SUBSET], cache_dtype="float32", progress=False
    )
    return root / "cache32"


@pytest.fixture(scope="module")
def cache16(prefix_teacher, prepared, root):
    """float16 (default) cache of the prefix-trained teacher over the prepared folder."""
    write_teacher_cache(prefix_teacher, prepared, root / "cache16", subsets=[SUBSET], progress=False)
    return root / "cache16"


def distinct_texts(demo_data):
    """{"query": distinct questions, "passage": distinct texts of every pos_doc and neg_doc} of the
    demo subset, read from its parquet files directly."""
    queries = pq.read_table(demo_data / SUBSET / "queries.parquet").to_pylist()
    corpus = pq.read_table(demo_data / SUBSET / "corpus.parquet").to_pylist()
    text = {row["id"]: row["text"] for row in corpus}
    passages = {text[doc["id"]] for q in queries for doc in [*q["pos_doc"], *(q["neg_doc"] or [])]}
    return {"query": sorted({q["question"] for q in queries}), "passage": sorted(passages)}


def instruction_prompts(demo_data):
    meta = json.loads((demo_data / SUBSET / "dataset_metadata.json").read_text())
    return {side: f"{meta[side + '_instruction']} " if meta[side + "_instruction"] else "" for side in PREFIXES}


@pytest.mark.parametrize(
    "cache_name, teacher_name, atol",
    [("cache32", "tiny_export", 1e-6), ("cache16", "prefix_teacher", 2e-3)],
)
def test_lookup_equals_the_teachers_own_encode_with_its_prompts(request, demo_data, cache_name, teacher_name, atol):
    from embedtrain import BiEncoder

    cache = TeacherCache(request.getfixturevalue(cache_name))
    teacher = BiEncoder.from_pretrained(request.getfixturevalue(teacher_name), device="cpu", dtype="float32")
    prompts = PREFIXES if teacher_name == "prefix_teacher" else instruction_prompts(demo_data)
    assert cache.metadata["prompts"] == {SUBSET: prompts}
    for side, texts in distinct_texts(demo_data).items():
        sample = [*texts[:4], *texts[-3:], texts[len(texts) // 2]]
        found = cache.lookup(sample, side)
        assert found.dtype == np.float32 and found.shape == (len(sample), cache.dim)
        np.testing.assert_allclose(found, teacher.encode(sample, prompt=prompts[side]), atol=atol)
        np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=atol * 4)
        if prompts[side]:  # the prompt is the teacher's, not left out
            assert np.abs(found - teacher.encode(sample, prompt=None)).max() > 1e-3


def test_counts_are_the_distinct_texts_and_teacher_json_says_what_was_built(cache32, cache16, demo_data, tiny_export):
    texts = distinct_texts(demo_data)
    expected = {side: len(texts[side]) for side in texts}
    for folder, dtype in ((cache32, "float32"), (cache16, "float16")):
        cache = TeacherCache(folder)
        meta = json.loads((folder / "teacher.json").read_text())
        assert meta["format"] == CACHE_FORMAT and meta["counts"] == expected and meta["subsets"] == [SUBSET]
        assert meta["cache_dtype"] == dtype and meta["teacher_dim"] == cache.dim == 64 and len(cache) == 600
        assert meta["shared_across_prompts"] == {"query": 0, "passage": 0}
        for side in texts:
            hashes = np.load(folder / f"{side}-hashes.npy")
            assert hashes.dtype == np.int64 and len(hashes) == expected[side] and np.all(np.diff(hashes) > 0)
            assert np.load(folder / f"{side}-embeddings.npy").dtype == np.dtype(dtype)
        assert cache.lookup(texts["passage"], "passage").shape == (expected["passage"], 64)
    assert json.loads((cache32 / "teacher.json").read_text())["teacher"] == str(tiny_export.resolve())
    # the raw folder's prepared copy went away with the temporary folder; nothing else was left next to it
    assert sorted(p.name for p in cache32.iterdir()) == sorted(
        ["teacher.json", *(f"{s}-{kind}.npy" for s in texts for kind in ("hashes", "embeddings"))]
    )
    assert not [p for p in cache32.parent.iterdir() if p.name.startswith(".")]


def test_missing_text_and_foreign_folders_are_errors_that_say_what_to_do(cache32, demo_data, tmp_path):
    cache = TeacherCache(cache32)
    long_text = "An unseen passage about copper rivers " * 5
    with pytest.raises(DataError) as error:
        cache.lookup([distinct_texts(demo_data)["passage"][0], long_text], "passage")
    message = str(error.value)
    assert str(cache32) in message and "passage text" in message and long_text[:80] in message
    assert long_text[:81] not in message and "embedtrain encode" in message and "--teacher-cache" in message
    # a query text is looked up in the query table only
    query = distinct_texts(demo_data)["query"][0]
    assert cache.lookup([query], "query").shape == (1, 64)
    with pytest.raises(DataError, match="the passage text"):
        cache.lookup([query], "passage")
    with pytest.raises(ValueError, match="side 'document'"):
        cache.lookup([query], "document")
    with pytest.raises(DataError, match=f"{tmp_path} is not a teacher cache"):
        TeacherCache(tmp_path)
    (tmp_path / "teacher.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match=f"{tmp_path}: teacher cache format 'something-else'"):
        TeacherCache(tmp_path)


def test_command_line_builds_the_cache_and_refuses_plain_encode_options(prefix_teacher, prepared, cache16, tmp_path):
    from embedtrain.cli import main

    out = tmp_path / "cli-cache"
    args = ["encode", prefix_teacher, "--teacher-cache", prepared, "--output", out, "--subsets", SUBSET]
    run = embedtrain_cli(*args, "--cache-dtype", "float32", "--device", "cpu", "--batch-size", "16")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote the teacher cache of 400 queries and 200 passages" in run.stdout
    built, reference = TeacherCache(out), TeacherCache(cache16)
    assert built.metadata["cache_dtype"] == "float32" and built.metadata["counts"] == reference.metadata["counts"]
    texts = ["Shilin Linlofo is a chemist."]
    np.testing.assert_allclose(built.lookup(texts, "query"), reference.lookup(texts, "query"), atol=2e-3)

    runner = CliRunner()
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("a text\n")
    refused = runner.invoke(main, [*map(str, args), "--input", str(texts_file), "--prompt", "query"])
    assert refused.exit_code == 2 and "--input, --prompt cannot be used with --teacher-cache" in refused.output
    alone = runner.invoke(main, ["encode", str(prefix_teacher), "--output", str(tmp_path / "x.npy"), "--subsets", "A"])
    assert alone.exit_code == 2 and "--subsets only go with --teacher-cache" in alone.output
    missing = runner.invoke(main, ["encode", str(prefix_teacher), "--output", str(tmp_path / "x.npy")])
    assert missing.exit_code == 2 and "Missing option '--input'" in missing.output
    help_text = runner.invoke(main, ["encode", "--help"]).output
    assert "--teacher-cache DATA" in help_text and "Teacher:  embedtrain encode" in help_text


def test_a_failed_build_leaves_the_old_cache_and_a_finished_one_replaces_it(
    tiny_export, prepared, cache32, tmp_path, monkeypatch
):
    import embedtrain.teacher_cache

    output = tmp_path / "cache"
    shutil.copytree(cache32, output)
    before = (output / "teacher.json").read_text()
    real, calls = embedtrain.teacher_cache.encode_texts, []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(embedtrain.teacher_cache, "encode_texts", dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        write_teacher_cache(tiny_export, prepared, output, subsets=[SUBSET], progress=False)
    assert (output / "teacher.json").read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    monkeypatch.setattr(embedtrain.teacher_cache, "encode_texts", real)
    summary = write_teacher_cache(tiny_export, prepared, output, subsets=[SUBSET], progress=False)
    assert summary["cache_dtype"] == "float16" and TeacherCache(output).metadata == summary
    assert not summary["prepared_from_raw"] and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    texts = ["Shilin Linlofo is a chemist."]
    np.testing.assert_allclose(
        TeacherCache(output).lookup(texts, "query"), TeacherCache(cache32).lookup(texts, "query"), atol=2e-3
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a teacher cache"):
        write_teacher_cache(tiny_export, prepared, tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


class Lookups(torch.utils.data.Dataset):
    def __init__(self, cache, texts):
        self.cache, self.texts = cache, texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, index):
        return torch.from_numpy(self.cache.lookup([self.texts[index]], "query")[0])


def test_cache_pickles_as_its_path_and_works_in_dataloader_workers(cache16, demo_data):
    cache = TeacherCache(cache16)
    texts = distinct_texts(demo_data)["query"][:6]
    expected = cache.lookup(texts, "query")  # the tables are mapped now: pickling must not copy them
    payload = pickle.dumps(cache)
    assert len(payload) < 4096
    np.testing.assert_array_equal(pickle.loads(payload).lookup(texts, "query"), expected)
    loader = torch.utils.data.DataLoader(Lookups(cache, texts), batch_size=3, num_workers=2)
    np.testing.assert_array_equal(torch.cat(list(loader)).numpy(), expected)
