"""One prompt policy everywhere: a prefix-trained and an instruction-trained model get the same
prompts in training, in-training evaluation, export, eval, mine and encode, passage instructions
included."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from test_cli import embedtrain
from transformers import PreTrainedTokenizerFast

from conftest import ASSETS
from embedtrain.config import load_config
from embedtrain.data.collate import Collator
from embedtrain.data.nemotron import read_metadata, subset_folders
from embedtrain.data.shards import PreparedDataset
from embedtrain.export import export_checkpoint
from embedtrain.model.encoder import load_tokenizer
from embedtrain.prompts import PromptPolicy, model_policy, training_policy
from embedtrain.train.evaluation import load_sources

PASSAGE_INSTRUCTION = "Represent this passage for retrieval:"
PREFIXES = {"prefix": ["data.query_prefix=query:", "data.passage_prefix=passage:"], "instruction": []}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo data with a passage instruction on FEVER (the demo subsets have none)."""
    folder = tmp_path_factory.mktemp("prompts") / "data"
    shutil.copytree(ASSETS / "demo-data", folder)
    meta_file = folder / "FEVER" / "dataset_metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["passage_instruction"] = PASSAGE_INSTRUCTION
    meta_file.write_text(json.dumps(meta, indent=2))
    return folder


def expected(kind, meta):
    """The prompts a model of this kind must get for a subset: the rule, written out by hand."""
    if kind == "prefix":
        return "query: ", "passage: "
    passage = meta["passage_instruction"]
    return meta["query_instruction"] + " ", passage + " " if passage else ""


@pytest.fixture(scope="module", params=list(PREFIXES))
def trained(request, data, tmp_path_factory):
    kind = request.param
    run = tmp_path_factory.mktemp(kind) / "run"
    overrides = ["train.max_steps=1", "logging.every=1", f"data.path={data}", *PREFIXES[kind]]
    result = embedtrain("train", "--config", "tiny", "--output-dir", run, *[a for o in overrides for a in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config("tiny", [*overrides, f"eval.path={data}"], output_dir=run)
    return kind, config, run, export_checkpoint(run, run.parent / "export")


class Recorder:
    """Every text the tokenizer is asked to encode, while active."""

    def __init__(self, monkeypatch):
        self.texts = []
        real = PreTrainedTokenizerFast.__call__

        def record(tokenizer, text=None, *args, **kwargs):
            self.texts += [text] if isinstance(text, str) else list(text or [])
            return real(tokenizer, text, *args, **kwargs)

        monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", record)

    def saw(self, prompt, text):
        return prompt + text in self.texts


def first_texts(folder):
    query = pq.read_table(folder / "queries.parquet", columns=["question"]).column(0)[0].as_py()
    document = pq.read_table(folder / "corpus.parquet", columns=["text"]).column(0)[0].as_py()
    return query, document


def test_prompts_agree_in_all_six_places(trained, data, tmp_path, monkeypatch):
    kind, config, run, export = trained
    subsets = {folder.name: read_metadata(folder) for folder in subset_folders(data)}
    wanted = {name: expected(kind, meta) for name, meta in subsets.items()}
    assert wanted["FEVER"][1] == ("passage: " if kind == "prefix" else PASSAGE_INSTRUCTION + " ")

    # 1. training: the collator's prompts per subset
    prepared = PreparedDataset(run / "prepared")
    collator = Collator(load_tokenizer(config.model.path), config.data, prepared.info)
    assert collator.subset_prompts == wanted
    # 2. in-training evaluation
    sources = load_sources(config.eval, collator.policy)
    for name, (_, query_texts, _, doc_texts, _) in sources.items():
        query, document = first_texts(data / name)
        assert wanted[name][0] + query in query_texts and wanted[name][1] + document in doc_texts
    # 3. export: the recorded policy is the run's, and its defaults are the sentence-transformers prompts
    policy = model_policy(export)
    assert policy == training_policy(config.data, prepared.info)
    assert {name: policy.for_subset(meta) for name, meta in subsets.items()} == wanted
    st_prompts = json.loads((export / "config_sentence_transformers.json").read_text())["prompts"]
    first = next(iter(prepared.info))
    assert st_prompts == {"query": wanted[first][0], "document": wanted[first][1]}

    recorder = Recorder(monkeypatch)
    # 4. eval, 5. mine: the text of each subset's first query and document behind the subset's prompts
    from embedtrain.eval import evaluate
    from embedtrain.mine import mine

    evaluate(export, data)
    evaluated, recorder.texts = recorder.texts, []
    mine(export, data, tmp_path / "mined", top_k=2)
    mined, recorder.texts = recorder.texts, []
    for texts in (evaluated, mined):
        recorder.texts = texts
        for name in subsets:
            query, document = first_texts(data / name)
            assert recorder.saw(wanted[name][0], query) and recorder.saw(wanted[name][1], document), name
    # 6. encode: text without a subset gets the model's defaults
    from embedtrain.encode import encode_file

    (tmp_path / "in.txt").write_text("a claim about copper\n")
    recorder.texts = []
    encode_file(export, tmp_path / "in.txt", tmp_path / "q.npy", prompt="query")
    encode_file(export, tmp_path / "in.txt", tmp_path / "d.npy", prompt="document")
    assert recorder.saw(st_prompts["query"], "a claim about copper")
    assert recorder.saw(st_prompts["document"], "a claim about copper")


def test_policy_rules():
    meta = {"query_instruction": "Instruct: find\nQuery:", "passage_instruction": ""}
    assert PromptPolicy().for_subset(meta) == ("Instruct: find\nQuery: ", "")
    assert PromptPolicy("query:", "passage:").for_subset(meta) == ("query: ", "passage: ")
    assert PromptPolicy("query:", None).for_subset({**meta, "passage_instruction": "Doc:"}) == ("query: ", "Doc: ")
    assert PromptPolicy(None, None, "q ", "d ").for_subset(None) == ("q ", "d ")
    assert PromptPolicy.from_dict(PromptPolicy("a", None, "a ", "").to_dict()) == PromptPolicy("a", None, "a ", "")
