"""Tiny random checkpoints of every backbone family, for tests and CPU trials: the family's causal
LM class at toy size with random weights, and the tiny Llama's tokenizer (its 1,024 ids), written
as a model folder like a downloaded checkpoint.

    python -m embedtrain.model.tiny qwen3 /tmp/tiny-qwen3
"""

import argparse
import shutil
from pathlib import Path

import torch
import transformers

TINY_LLAMA = Path(__file__).resolve().parents[1] / "assets" / "tiny-llama"

SHAPE = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1022,
    eos_token_id=1023,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
# head_dim != hidden / heads where the family allows it, so that code assuming it fails here
FAMILY_SHAPES = {
    "mistral": dict(
        SHAPE, head_dim=16, sliding_window=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
    "ministral3": dict(
        SHAPE,
        head_dim=24,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 16.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
    ),
    "qwen3": dict(SHAPE, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}
CLASSES = {
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny(family, out, seed=0):
    """Write a tiny random `family` checkpoint (its ForCausalLM class) to `out`; returns `out`."""
    config_name, model_name = CLASSES[family]
    config = getattr(transformers, config_name)(**FAMILY_SHAPES[family])
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    out = Path(out)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, out / name)
    return out


def make_tiny_wrapper(out, seed=0):
    """A tiny `mistral3` vision-language checkpoint (Mistral3ForConditionalGeneration) around the
    tiny ministral3 text model, saved in the layout of mistralai's Ministral 3 releases."""
    text = transformers.Ministral3Config(**FAMILY_SHAPES["ministral3"])
    vision = transformers.PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration(
        transformers.Mistral3Config(text_config=text, vision_config=vision)
    )
    out = Path(out)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, out / name)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=sorted(CLASSES))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny(args.family, args.out, args.seed))


if __name__ == "__main__":
    main()
