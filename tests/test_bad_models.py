"""Bad model folders and command-line mistakes (issue 28, item 7): each gets one line that says what
is wrong, where (the folder or option) and the fix, exit code 2, and nothing half-written. Also the
float32 storage of eval (an exact float32 search), the distillation log line and the help texts.

The commands run in-process through click's CliRunner (no interpreter start); `fail` ends a process
with os._exit, so `shutdown` is swapped for a SystemExit that CliRunner records as the exit code."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ASSETS
from embedtrain.cli import main
from embedtrain.config import RECIPES_DIR
from embedtrain.errors import ModelError

DEMO = ASSETS / "demo-data"


@pytest.fixture
def folders(tiny_export, tmp_path):
    """The folders users mistake for a model: the run the export came from (read only), one of its
    step folders, and an export whose config.json is missing (a copy)."""
    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_export, no_config, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    run = tiny_export.parent / "run"
    return {
        "RUN": run,
        "STEP": run / "checkpoints" / "step_2",
        "NOCONFIG": no_config,
        "MODEL": tiny_export,
    }


RUN_MESSAGE = (
    r"{option} {RUN} is a training run folder, not an exported model: export it first: "
    r"`embedtrain export {RUN} OUT`, then give OUT"
)
NO_CONFIG = (
    r"{option} {NOCONFIG} has no config.json, so it is not an exported model folder: give the folder "
    r"`embedtrain export RUN OUT` wrote \(config.json, model.safetensors, tokenizer\)"
)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["eval", "RUN", DEMO, "--output", "OUT/metrics.json"], RUN_MESSAGE, id="eval-run-folder"),
        pytest.param(
            ["eval", "STEP", DEMO, "--output", "OUT/metrics.json"],
            RUN_MESSAGE.replace("{RUN}", "{STEP}"),
            id="eval-step-folder",
        ),
        pytest.param(["eval", "NOCONFIG", DEMO, "--output", "OUT/metrics.json"], NO_CONFIG, id="eval-no-config"),
        pytest.param(
            ["eval", "MODEL", DEMO, "--rerank", "RUN", "--output", "OUT/metrics.json"],
            RUN_MESSAGE.replace("{option}", "--rerank"),
            id="eval-rerank-run-folder",
        ),
        pytest.param(["encode", "RUN", "--input", "TEXTS", "--output", "OUT/e.npy"], RUN_MESSAGE, id="encode-run"),
        pytest.param(
            ["encode", "NOCONFIG", "--input", "TEXTS", "--output", "OUT/e.npy"], NO_CONFIG, id="encode-no-config"
        ),
        pytest.param(
            ["rerank", "NOCONFIG", "--input", "PAIRS", "--output", "OUT/s.jsonl"], NO_CONFIG, id="rerank-no-config"
        ),
        pytest.param(["rerank", "RUN", "--input", "PAIRS", "--output", "OUT/s.jsonl"], RUN_MESSAGE, id="rerank-run"),
        pytest.param(["mine", "RUN", DEMO, "OUT/mined"], RUN_MESSAGE, id="mine-run-folder"),
    ],
)
def test_a_folder_that_is_no_model_gets_one_line_and_exit_2(run_cli, folders, tmp_path, args, message):
    (tmp_path / "texts.txt").write_text("a text\n")
    (tmp_path / "pairs.jsonl").write_text('{"query": "q", "passage": "p"}\n')
    out = tmp_path / "out"
    names = {**folders, "TEXTS": tmp_path / "texts.txt", "PAIRS": tmp_path / "pairs.jsonl"}
    argv = [str(names.get(a, a)).replace("OUT", str(out)) if isinstance(a, str) else a for a in args]
    code, output = run_cli(*argv)
    option = "model" if args[0] == "encode" else "MODEL"  # encode reports through BiEncoder.from_pretrained
    expected = message.format(option=option, **{k: re.escape(str(v)) for k, v in folders.items()})
    errors = [line for line in output.splitlines() if line.startswith("embedtrain: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in output, output
    assert re.fullmatch("embedtrain: error: " + expected, errors[0]), errors[0]
    assert "is an embedding model" not in output  # rerank used to call any folder one
    assert not out.exists()  # nothing made, nothing half-written


@pytest.mark.parametrize("loader", ["BiEncoder", "Reranker"])
@pytest.mark.parametrize("name", ["RUN", "NOCONFIG"])
def test_from_pretrained_refuses_a_folder_that_is_no_model_naming_it(folders, loader, name):
    import embedtrain

    with pytest.raises(ModelError, match=re.escape(f"model {folders[name]} ")):
        getattr(embedtrain, loader).from_pretrained(folders[name], device="cpu")


def test_the_cleanup_never_removes_what_was_there_or_a_checkpoint(tmp_path):
    from embedtrain.train.run_folder import removed_if_failed

    def fail_in(run_dir, write):
        with pytest.raises(RuntimeError), removed_if_failed(run_dir):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            write(Path(run_dir))
            raise RuntimeError("failed")

    mine = tmp_path / "users" / "run"  # the user's folder, with their file: kept whole
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    fail_in(mine, lambda d: (d / "config.yaml").write_text("x"))
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "config.yaml").is_file()

    started = tmp_path / "a" / "started"  # a checkpoint was begun: the run's state is kept
    fail_in(started, lambda d: (d / "checkpoints" / "step_5.partial").mkdir(parents=True))
    assert (started / "checkpoints" / "step_5.partial").is_dir()

    shared = tmp_path / "shared"  # created with the run, but another run's folder appeared in it
    fail_in(shared / "run", lambda d: (shared / "other").mkdir())
    assert sorted(p.name for p in shared.iterdir()) == ["other"]

    with removed_if_failed(tmp_path / "ok"):  # success: nothing removed
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()


def test_eval_float32_storage_is_an_exact_float32_search(tiny_export, tmp_path):
    """`eval --storage float32` equals a float32 brute-force search over the same vectors (one block
    of texts, so that the encoder sees the same batches); the stored vectors are the encoder's bit for
    bit, where float16 storage rounds them."""
    from embedtrain.eval import evaluate, subset_sources
    from embedtrain.inference import BiEncoder
    from embedtrain.inference.batching import encode_texts
    from embedtrain.retrieval import ListTexts, encode_to_file, metrics

    subset, batch = DEMO / "SyntheticClassificationData", 256  # 6 documents, 200 queries: one block each
    result = evaluate(tiny_export, subset, batch_size=batch, device="cpu", storage="float32")
    model = BiEncoder.from_pretrained(tiny_export, device="cpu")
    length = model.max_seq_length
    query_ids, queries, corpus, doc_ids, qrels, prompt = subset_sources(subset, model.prompt_policy)
    docs = encode_texts(model.module, model.tokenizer, next(corpus.blocks(0, len(corpus), batch)), batch, length)
    vectors = encode_texts(model.module, model.tokenizer, [prompt + t for t in queries], batch, length)
    order = np.argsort(-(vectors @ docs.T), axis=1, kind="stable")[:, :100]  # float32 scores
    ids = doc_ids.to_pylist()
    brute = metrics({qid: [ids[i] for i in row] for qid, row in zip(query_ids, order)}, qrels)
    assert vectors.dtype == np.float32 and result["subsets"][subset.name] == brute

    few = ListTexts(queries[:16], prompt)
    reference = encode_texts(model.module, model.tokenizer, next(few.blocks(0, 16, batch)), batch, length)
    for storage in ("float32", "float16"):
        file = encode_to_file(model.module, model.tokenizer, few, tmp_path / storage, batch, length, storage=storage)
        assert np.array_equal(file.read(0, 16), reference) == (storage == "float32"), storage
        np.testing.assert_allclose(file.read(0, 16), reference, atol=1e-3)


def test_the_distillation_log_line_shows_window_means_of_the_loss_and_every_term(capsys):
    """The loss and its terms are means over the same logging window (two steps here), not the
    window's mean loss beside the last step's terms."""
    import torch

    from embedtrain.config import load_config
    from embedtrain.train.loop import log_window, new_window

    class Engine:
        def get_lr(self):
            return [1e-4]

        def get_global_grad_norm(self):
            return None

    window = new_window()
    steps = [
        {"loss": 1.0, "loss_contrastive": 0.5, "distill_cosine": 0.25},
        {"loss": 3.0, "loss_contrastive": 1.5, "distill_cosine": 0.75},
    ]
    for stats in steps:
        window["steps"] += 1
        for key, value in stats.items():
            window["stats"][key] = window["stats"].get(key, 0.0) + torch.tensor(value)
    last = {key: torch.tensor(value) for key, value in steps[-1].items()} | {"skipped_steps": torch.tensor(0.0)}
    log_window(Engine(), None, 2, last, window, load_config("tiny"))
    assert "step 2: loss 2.0000 (contrastive 1.0000 cos 0.5000)  acc" in capsys.readouterr().out


def test_train_help_lists_every_shipped_recipe_and_rerank_help_speaks_of_pairs():
    runner = CliRunner()
    train_help = " ".join(runner.invoke(main, ["train", "--help"]).output.split())
    recipes = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert len(recipes) >= 7 and all(name in train_help for name in recipes), train_help
    rerank_help = runner.invoke(main, ["rerank", "--help"]).output
    assert "embedding" not in rerank_help.lower() and "(query, passage) pairs" in rerank_help
    for command in ("eval", "mine"):
        assert "--storage [float16|float32]" in runner.invoke(main, [command, "--help"]).output
