"""Resume refuses a changed data order or LR schedule and names each changed setting (old -> new),
unless asked for (train.resume_new_data_order, train.resume_new_schedule); a checkpoint that lacks a
setting is not compared, with a warning; max_steps at or below the checkpoint's step is said so.
Unit tests of embedtrain.train.resume_checks.check_resume_settings: no training."""

import copy

import pytest

from embedtrain.config import load_config
from embedtrain.errors import CheckpointError
from embedtrain.train.resume_checks import check_resume_settings

SUBSETS = ["FEVER", "SciFact", "SyntheticClassificationData"]
STEP = 50


def saved(*overrides, recipe="tiny"):
    """A checkpoint of `recipe` at STEP: its config.yaml (as a dict) and its stream state."""
    config = load_config(recipe, list(overrides))
    stream = {
        "next_step": STEP,
        "seed": config.train.seed,
        "global_batch_size": config.train.global_batch_size,
        "mixing": config.data.mixing,
        "positive_sampling": config.data.positive_sampling,
        "subsets": config.data.subsets or SUBSETS,
        "num_queries": 1000,
    }
    return config.to_dict(), stream


def check(saved_pair, *overrides, recipe="tiny"):
    config_dict, stream = saved_pair
    return check_resume_settings(config_dict, stream, load_config(recipe, list(overrides)), "ckpt/step_50")


def refusal(saved_pair, *overrides, recipe="tiny"):
    with pytest.raises(CheckpointError) as error:
        check(saved_pair, *overrides, recipe=recipe)
    return str(error.value)


def test_the_same_settings_resume_without_a_word():
    assert check(saved()) == []
    assert check(saved(recipe="tiny_reranker"), recipe="tiny_reranker") == []


DATA_ORDER = [  # (the checkpoint's overrides, the resume's overrides, the words the refusal must hold)
    ([], ["train.seed=1"], "train.seed: 0 -> 1"),
    ([], ["train.global_batch_size=32"], "train.global_batch_size: 16 -> 32"),
    ([], ["data.mixing=temperature"], "data.mixing: proportional -> temperature"),
    (
        ["data.mixing=temperature"],
        ["data.mixing=temperature", "data.mixing_temperature=2.0"],
        "data.mixing_temperature: 1.0 -> 2.0",
    ),
    (
        ["data.mixing=single_subset"],
        ["data.mixing=single_subset", "data.subset_weights={FEVER: 2}"],
        'data.subset_weights: unset -> {"FEVER": 2}',
    ),
    (
        [],
        ["data.subsets=[FEVER, SciFact]"],
        'data.subsets: ["FEVER", "SciFact", "SyntheticClassificationData"] -> ["FEVER", "SciFact"]',
    ),
    (["data.subsets=[FEVER]"], [], 'data.subsets: ["FEVER"] -> every subset under data.path'),
    ([], ["data.positive_sampling=cycle"], "data.positive_sampling: first -> cycle"),
    ([], ["data.length_bucketing=true"], "data.length_bucketing: false -> true"),
    ([], ["data.query_max_length=32"], "data.query_max_length: 64 -> 32"),
    ([], ["data.passage_max_length=48"], "data.passage_max_length: 64 -> 48"),
]


@pytest.mark.parametrize("before, after, words", DATA_ORDER, ids=[w.split(":")[0] for *_, w in DATA_ORDER])
def test_each_data_order_change_is_refused_by_name_unless_asked(before, after, words):
    message = refusal(saved(*before), *after)
    assert "resuming from ckpt/step_50: the data order would change (" + words in message
    assert "train.resume_new_data_order=true" in message
    notes = check(saved(*before), *after, "train.resume_new_data_order=true")
    assert notes == [f"[embedtrain] resuming on a new data order (train.resume_new_data_order): {words}"]


def test_reranker_lengths_and_every_change_at_once():
    message = refusal(saved(recipe="tiny_reranker"), "data.pair_max_length=64", recipe="tiny_reranker")
    assert "data.pair_max_length: 128 -> 64" in message
    message = refusal(saved(), "data.mixing=temperature", "train.seed=3", "train.max_steps=200")
    assert "(train.seed: 0 -> 3, data.mixing: proportional -> temperature)" in message
    assert "the learning-rate schedule would change (train.max_steps: 100 -> 200)" in message


def test_settings_that_do_not_decide_the_order_may_change():
    # the temperature counts only in the weighted modes; layout, cuts and negatives are not the order
    assert check(saved(), "data.mixing_temperature=3.0", "data.packing=false", "train.micro_batch_tokens=400") == []
    assert check(saved(), "loss.hard_negatives=1", "train.micro_batch_size=4", "data.pack_length=256") == []
    assert check(saved(), f"data.subsets=[{', '.join(SUBSETS)}]") == []  # the subsets the run resolved
    weighted = ["data.mixing=temperature", "data.subset_weights={FEVER: 1, SciFact: 2}"]
    assert check(saved(*weighted), *weighted, "data.mixing_temperature=5.0") == []  # weights win


SCHEDULE = [
    (["train.max_steps=200"], "train.max_steps: 100 -> 200"),
    (["optim.warmup_steps=20"], "optim.warmup_steps: 10 -> 20"),
    (["optim.schedule=cosine"], "optim.schedule: linear -> cosine"),
    (["optim.min_lr_ratio=0.1"], "optim.min_lr_ratio: 0.0 -> 0.1"),
]


@pytest.mark.parametrize("after, words", SCHEDULE, ids=[w.split(":")[0] for _, w in SCHEDULE])
def test_a_schedule_change_is_refused_by_name_unless_asked(after, words):
    message = refusal(saved(), *after)
    assert f"the learning-rate schedule would change ({words}): " in message
    assert "train.resume_new_schedule=true" in message
    assert check(saved(), *after, "train.resume_new_schedule=true") == [
        f"[embedtrain] resuming on a new LR schedule (train.resume_new_schedule): {words}"
    ]


def test_a_constant_schedule_may_run_longer():
    constant = "optim.schedule=constant"
    assert check(saved(constant), constant, "train.max_steps=500") == []


def test_a_new_learning_rate_is_refused_even_when_asked():
    message = refusal(saved(), "train.lr=1e-3", "train.resume_new_schedule=true")
    assert "train.lr: 0.0003 -> 0.001 would be ignored: a resumed run keeps the checkpoint's learning rate" in message


def test_max_steps_at_or_below_the_checkpoints_step():
    assert check(saved("train.max_steps=50"), "train.max_steps=50") == [
        "[embedtrain] run already finished at step 50 (ckpt/step_50); nothing to do"
    ]
    message = refusal(saved(), "train.max_steps=20", "train.resume_new_schedule=true")
    assert message.startswith("train.max_steps=20 is below the step of the checkpoint ckpt/step_50 (50)")
    assert "Set train.max_steps above 50 (with train.resume_new_schedule=true)" in message


def test_a_checkpoint_without_the_settings_is_not_compared_but_warned_about():
    config_dict, stream = saved()
    old = copy.deepcopy(config_dict)
    for key in ("mixing_temperature", "subset_weights", "length_bucketing", "positive_sampling", "mixing"):
        del old["data"][key]
    del old["optim"]["min_lr_ratio"]
    del stream["positive_sampling"]  # older still: the setting did not exist (it was always "first")
    refused = refusal((old, stream), "data.positive_sampling=cycle")  # "first" then, and the stream's mixing
    assert "data.positive_sampling: first -> cycle" in refused
    assert "data.mixing: proportional -> temperature" in refusal((old, stream), "data.mixing=temperature")
    # without config.yaml at all: the stream state's own fields are still compared
    assert "train.seed: 0 -> 1" in refusal((None, stream), "train.seed=1")
    assert check((None, stream))[0].startswith("[embedtrain] warning: ckpt/step_50 does not record ")
    assert check((old, stream), "data.mixing_temperature=2.0") == [  # the stream's mixing: proportional
        "[embedtrain] warning: ckpt/step_50 does not record data.length_bucketing, optim.min_lr_ratio "
        "(an older checkpoint): not compared on resume"
    ]
    del stream["mixing"]  # unknown mixing: the weighted modes' settings are unknown too
    notes = check((old, stream), "data.mixing=temperature", "data.mixing_temperature=2.0", "optim.min_lr_ratio=0.5")
    assert notes == [
        "[embedtrain] warning: ckpt/step_50 does not record data.mixing, data.length_bucketing, "
        "data.subset_weights, data.mixing_temperature, optim.min_lr_ratio (an older checkpoint): not compared on resume"
    ]


@pytest.mark.parametrize(
    "recipe, before, after, words",
    [
        ("tiny", [], ["model.kind=multi_vector"], "model.kind: embedding -> multi_vector"),
        ("tiny_colbert", [], ["model.multi_vector={dim: 16}"], "model.multi_vector.dim: 32 -> 16"),
        ("tiny_sparse", [], ["model.sparse={inference_free_queries: true}"], "inference_free_queries: false -> true"),
        ("tiny", [], ["model.lora={}"], "model.lora: unset -> "),
    ],
)
def test_a_change_of_the_model_is_refused_whatever_the_opt_ins(recipe, before, after, words):
    """The checkpoint's parameters belong to one model: another kind, width, query table or adapter
    would not load into it (DeepSpeed's own error, after the model is built), so the resume says which
    setting changed before anything loads, with or without the opt-ins."""
    opt_ins = ["train.resume_new_data_order=true", "train.resume_new_schedule=true"]
    message = refusal(saved(*before, recipe=recipe), *after, *opt_ins, recipe=recipe)
    assert "the model would change" in message and words in message, message
    assert check(saved(recipe=recipe), recipe=recipe) == []
