"""The model-kind registry (embedtrain/kinds): it is the one place that names the kinds, and the
training loop, engine builder, run files, resume checks and export reach a kind only through it, so
a kind registered in-process (a toy fifth kind here) is what every one of those call sites calls."""

import ast
import json
import types
from pathlib import Path

import pytest
import torch

from embedtrain.config import CHOICES, load_config
from embedtrain.export import EXPORT_FORMATS
from embedtrain.kinds import KINDS, kind_of, recorded_kind
from embedtrain.kinds.base import ModelKind
from embedtrain.model.encoder import load_tokenizer, read_model_config
from embedtrain.train import engine as engine_module
from embedtrain.train import loop
from embedtrain.train.resume_checks import order_settings

PACKAGE = Path(__file__).resolve().parent.parent / "embedtrain"


def kind_tests(path, root=PACKAGE.parent):
    """'file:line' (relative to `root`) of every comparison in `path` that tests a kind: `x.kind == ...`,
    `... in x.kind`, one with a registered kind's name ("reranker", "embedding") or with the key
    "model.kind" (a config tree's `_get(tree, "model.kind") == ...`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        on_kind = any(isinstance(side, ast.Attribute) and side.attr == "kind" for side in sides)
        named = any(isinstance(side, ast.Constant) and side.value in KINDS for side in sides)
        model_kind = any(isinstance(side, ast.Constant) and side.value == "model.kind" for side in ast.walk(node))
        if on_kind or named or model_kind:
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_the_training_side_and_export_do_not_branch_on_the_kind():
    files = sorted((PACKAGE / "train").glob("*.py")) + [PACKAGE / "export.py"]
    found = [line for path in files for line in kind_tests(path)]
    assert not found, "model.kind tested outside embedtrain/kinds (ask kind_of(config) instead):\n" + "\n".join(found)


def test_the_finder_sees_a_kind_test(tmp_path):
    path = tmp_path / "loop.py"
    path.write_text('if config.model.kind == "reranker":\n    pass\nif _get(tree, "model.kind") is None:\n    pass\n')
    assert kind_tests(path, tmp_path) == ["loop.py:1", "loop.py:3"]


def test_every_kind_is_a_config_choice_and_has_an_export_format():
    assert CHOICES["model.kind"] == tuple(KINDS)
    assert all(kind.name == name and kind.export_format in EXPORT_FORMATS for name, kind in KINDS.items())


class ToyKind(ModelKind):
    """A fifth kind that records each call the training side makes on it."""

    name = "toy"
    base_model_file = "toy.json"
    export_format = "toy"
    length_keys = ("data.toy_length",)
    eval_note = "  (toy eval)"

    def __init__(self):
        self.calls = []

    def check_family(self, family, config):
        self.calls.append(("check_family", family.name))

    def build_module(self, config, backbone, dtype, teacher_dim=None):
        self.calls.append(("build_module", type(backbone).__name__, dtype, teacher_dim))
        return "toy module"

    def make_collator(self, tokenizer, config, dataset_info, one_row, teacher=None):
        self.calls.append(("make_collator", tokenizer, dataset_info, one_row, teacher))
        return types.SimpleNamespace(policy=types.SimpleNamespace(to_dict=lambda: {"toy": True}))

    def backward(self, engine, batch, config, divisor, group=None, boundary=None):
        self.calls.append(("backward", divisor, group, boundary))
        return torch.tensor(1.5), {"toy_stat": torch.tensor(0.25)}

    def budget_chunks(self, config):
        return "toy budget"

    def eval_sources(self, config, collator):
        return "toy sources"

    def evaluate(self, engine, tokenizer, sources, config):
        self.calls.append(("evaluate", sources))
        return {"mean": {"ndcg@10": 0.5, "recall@10": 0.75, "mrr@10": 0.25}}

    def base_model_files(self, config):
        return {self.base_model_file: {"kind": self.name, "toy_setting": 7}}


@pytest.fixture
def toy(monkeypatch):
    kind = ToyKind()
    monkeypatch.setitem(KINDS, "toy", kind)
    config = load_config("tiny")
    config.model.kind = "toy"  # past the config's own check of model.kind: the registry is what is tested
    config.eval.path = "held-out"
    return kind, config


def test_a_fifth_kind_registered_in_process_is_what_the_training_side_calls(toy, tmp_path, capsys):
    kind, config = toy
    assert kind_of(config) is kind
    # set_up's collator, the token budget's cut, the held-out data, the backward of a step
    collator = loop.make_collator(config, "tokenizer", types.SimpleNamespace(info={"subset": {}}), "teacher")
    assert kind.calls.pop() == ("make_collator", "tokenizer", {"subset": {}}, False, "teacher")
    assert loop.budget_chunks(config) == "toy budget"
    assert loop.open_eval_sources(config, collator) == "toy sources"
    engine = types.SimpleNamespace(step=lambda: None, skipped_steps=0)
    stats = loop.optimizer_step(engine, [{"positive_hash": torch.zeros(2, 1)}], config, 1, group="group")
    assert kind.calls.pop() == ("backward", 1.0, "group", True)
    assert float(stats["loss"]) == 1.5 and float(stats["toy_stat"]) == 0.25
    # in-training evaluation and its line
    loop.evaluate(engine, "tokenizer", "toy sources", config, None, 3)
    assert kind.calls.pop() == ("evaluate", "toy sources")
    assert capsys.readouterr().out.rstrip().endswith("MRR@10 0.2500  (toy eval)")
    # the engine's module around the backbone
    assert engine_module.build_encoder(config, torch.float32, checkpointing=0) == "toy module"
    assert kind.calls == [("check_family", "llama"), ("build_module", "LlamaBidirectionalModel", torch.float32, None)]
    # the run's base_model files, which the export reads the kind back from
    backbone = types.SimpleNamespace(config=read_model_config(config.model.path))
    run = types.SimpleNamespace(
        config=config,
        run_dir=tmp_path,
        engine=types.SimpleNamespace(module=types.SimpleNamespace(backbone=backbone)),
        tokenizer=load_tokenizer(config.model.path),
        collator=collator,
        ds_config={},
    )
    loop.write_run_files(run)
    assert json.loads((tmp_path / "base_model" / "toy.json").read_text()) == {"kind": "toy", "toy_setting": 7}
    assert recorded_kind(tmp_path / "base_model") == (kind, {"kind": "toy", "toy_setting": 7})
    # a resume compares the kind's length settings
    assert "data.toy_length" in order_settings({"model": {"kind": "toy"}})
