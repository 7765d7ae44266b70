"""Every shipped recipe and ds_config loads and validates; bad keys and values fail by name."""

import json

import pytest

from embedtrain.autoconfig import GIB, Hardware
from embedtrain.config import (
    AUTO_KEY,
    DS_CONFIGS_DIR,
    RECIPES_DIR,
    ConfigError,
    batch_layout,
    checkpoint_every,
    deepspeed_config,
    load_config,
)
from embedtrain.plan import RECIPE_SHAPES, SHAPES
from embedtrain.shape import Shape

PATHS = ["model.path=/models/x", "data.path=/data/x"]


EIGHT_H100 = Hardware(1, 8, 80 * GIB, "test")


def recipe_shape(recipe):
    """The base model's shape of a shipped GPU recipe (its model.path is a placeholder here)."""
    name = RECIPE_SHAPES.get(recipe.removesuffix("_reranker"))
    return Shape(**SHAPES[name]) if name else None


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    config = load_config(recipe, PATHS)
    micro, accumulation = batch_layout(config, 1)
    assert micro * accumulation == config.train.global_batch_size
    assert deepspeed_config(config, 1, shape=recipe_shape(recipe))["train_batch_size"] == config.train.global_batch_size
    if recipe_shape(recipe) is not None:  # the GPU recipes choose their stage and recompute: on 8 x 80 GiB all fit
        ds = deepspeed_config(config, 8, EIGHT_H100, recipe_shape(recipe))
        assert config.deepspeed["config"] == "auto" and ds[AUTO_KEY]["fits"], ds.get(AUTO_KEY)
        assert checkpoint_every(config, ds) in range(0, 64)


def test_auto_resolves_and_explicit_settings_win(tiny_llama):
    """deepspeed.config=auto on the tiny model: ZeRO-2 (its states fit anything), bf16, the recipe's
    overrides merged on top (tiny: fp32, so no grad_accum_dtype: fp32 parameters accumulate in fp32
    already; tests/test_grad_accum.py covers bf16); a recipe's stage fixes
    the stage and auto picks the recompute for it; an explicit JSON with checkpointing=auto keeps
    the JSON's stage."""
    ds = deepspeed_config(load_config("tiny", ["deepspeed.config=auto", "train.activation_checkpointing=auto"]), 1)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"] == {"enabled": False, "check_grad_overflow": True}
    assert "data_types" not in ds and ds[AUTO_KEY]["checkpoint_every"] == 0
    assert ds[AUTO_KEY]["reason"].startswith("ZeRO-2") and "CPU: host memory" in ds[AUTO_KEY]["reason"]
    config = load_config("tiny", ["deepspeed.config=auto", "deepspeed.zero_optimization.stage=3"])
    ds = deepspeed_config(config, 1)
    assert (ds["zero_optimization"]["stage"], ds[AUTO_KEY]["leaf_modules"]) == (3, True)
    assert checkpoint_every(config, ds) == 1  # tiny's explicit true
    config = load_config("tiny", ["train.activation_checkpointing=auto"])  # zero3.json
    ds = deepspeed_config(config, 1)
    assert ds["zero_optimization"]["stage"] == 3 and ds[AUTO_KEY]["deepspeed_config"] == "zero3.json"
    assert checkpoint_every(config, ds) == 0 and ds[AUTO_KEY]["leaf_modules"] is False
    with pytest.raises(ConfigError, match="size the model from /models/x/config.json"):
        deepspeed_config(load_config("llama3_2_1b", PATHS), 1)


@pytest.mark.parametrize(
    "value, expected", [("true", 1), ("false", 0), ("2", 2), ("1", 1), ("auto", "auto"), ("yes", True)]
)
def test_activation_checkpointing_values(value, expected):
    config = load_config("tiny", [f"train.activation_checkpointing={value}"])
    assert config.train.activation_checkpointing == expected
    if expected != "auto":
        assert checkpoint_every(config, {}) == int(expected)


@pytest.mark.parametrize("value, message", [("0", "must be >= 1"), ("some", "is not true, false, auto")])
def test_bad_activation_checkpointing(value, message):
    with pytest.raises(ConfigError, match=f"train.activation_checkpointing.*{message}"):
        load_config("tiny", [f"train.activation_checkpointing={value}"])


@pytest.mark.parametrize("name", sorted(p.name for p in DS_CONFIGS_DIR.glob("*.json")))
def test_every_ds_config_resolves(name):
    config = load_config("tiny", [f"deepspeed.config={name}"])
    ds = deepspeed_config(config, 2)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == ds["train_batch_size"]


def test_recipe_values_from_their_sources():
    eight_b = load_config("llama_embed_nemotron_8b", PATHS)
    assert (eight_b.loss.temperature, eight_b.train.lr, eight_b.train.global_batch_size) == (0.02, 2e-6, 128)
    assert (eight_b.loss.negatives, eight_b.loss.hard_negatives, eight_b.model.pooling) == ("group", 4, "avg")
    one_b = load_config("llama3_2_1b", PATHS)
    assert (one_b.train.lr, one_b.data.query_prefix, one_b.data.passage_prefix) == (5e-6, "query:", "passage:")


def test_overrides_are_typed():
    config = load_config(
        "tiny",
        [
            "train.lr=1e-5",
            "train.max_steps=7",
            "data.subsets=[FEVER]",
            "deepspeed.bf16.enabled=false",
            "loss.negatives=local",
        ],
    )
    assert config.train.lr == 1e-5 and config.train.max_steps == 7 and config.data.subsets == ["FEVER"]
    assert deepspeed_config(config, 1)["bf16"]["enabled"] is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=1e-5", "unknown config key 'train.learning_rate'"),
        ("train.lrr=1e-5", "did you mean 'lr'"),
        ("trian.lr=1e-5", "unknown config section 'trian'.*did you mean 'train'"),
        ("train.max_steps=ten", "train.max_steps: expected an integer"),
        ("model.pooling=max", "model.pooling: 'max' is not one of avg, cls, last, weighted_avg"),
        ("loss.negatives=everything", "loss.negatives: 'everything' is not one of group, local, global"),
        ("deepspeed.bf17.enabled=true", "unknown DeepSpeed key.*did you mean 'bf16'"),
        ("train.global_batch_size=-4", "train.global_batch_size must be positive"),
        ("train.lr", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_batch_sizes_must_divide():
    config = load_config("tiny", ["train.global_batch_size=16", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="global_batch_size=16 is not divisible by train.micro_batch_size=3"):
        batch_layout(config, 1)
    config = load_config("tiny", ["train.global_batch_size=16", "train.micro_batch_size=8"])
    assert batch_layout(config, 2) == (8, 1)
    with pytest.raises(ConfigError, match="world size 4"):
        batch_layout(config, 4)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no recipe named 'tinny'.*did you mean 'tiny'"):
        load_config("tinny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochs'"):
        load_config(str(unknown), PATHS)


def test_deepspeed_rejects_a_mistyped_zero_key():
    config = load_config("tiny", ["deepspeed.zero_optimization.stage3_prefetch_bucket_sizee=3"])
    with pytest.raises(ConfigError, match="(?s)rejected by DeepSpeed.*stage3_prefetch_bucket_sizee"):
        deepspeed_config(config, 1)


def test_optimizer_in_ds_json_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3}}))
    config = load_config("tiny", [f"deepspeed.config={ds}"])
    with pytest.raises(ConfigError, match="optimizer and scheduler belong to the recipe"):
        deepspeed_config(config, 1)


def test_bf16_zero2_without_the_overflow_check_is_refused():
    config = load_config(
        "tiny",
        ["deepspeed.config=zero2.json", "deepspeed.bf16.enabled=true", "deepspeed.bf16.check_grad_overflow=false"],
    )
    with pytest.raises(ConfigError, match="bf16.check_grad_overflow=false under ZeRO stage 2"):
        deepspeed_config(config, 1)
    # ZeRO-3 skips on a non-finite gradient norm whatever this key says
    config = load_config("tiny", ["deepspeed.bf16.enabled=true", "deepspeed.bf16.check_grad_overflow=false"])
    assert deepspeed_config(config, 1)["zero_optimization"]["stage"] == 3


def test_string_settings_take_the_text_as_given():
    config = load_config("tiny", ["data.query_prefix=query:", "data.passage_prefix=passage: x", "model.path=/m/1.0"])
    assert (config.data.query_prefix, config.data.passage_prefix) == ("query:", "passage: x")
    assert config.model.path == "/m/1.0"
    assert load_config("tiny", ["data.query_prefix=null"]).data.query_prefix is None
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config("tiny", ["train.lr=fast"])
