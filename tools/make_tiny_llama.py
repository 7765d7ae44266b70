"""python tools/make_tiny_llama.py embedtrain/assets/tiny-llama [--vocab-size 1024] [--hidden-size 64]
    [--layers 2] [--heads 4] [--kv-heads 2] [--intermediate-size 128] [--seed 0] [--corpus-dir DIR]

Build a tiny, randomly initialised Llama-3-shaped model plus a real tokenizer, fully
offline, for tests and the CPU demo.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the demo
dataset texts (``embedtrain/assets/demo-data`` by default, or ``--corpus-dir``) plus a
built-in list of generic English, so it also works when no dataset is around. It is
set up the way Llama 3's tokenizer is: ``<|begin_of_text|>`` as bos,
``<|end_of_text|>`` as eos, no pad token (training code is expected to reuse eos), a
post-processor that puts bos in front of every sequence, and a byte-level
pre-tokenizer/decoder so any string round-trips.

The model is ``LlamaForCausalLM`` with Llama 3 conventions (rope_theta 500000,
8192 positions, untied embeddings) at toy size. Weights depend only on ``--seed``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
MAX_POSITIONS = 8192
DEFAULT_CORPUS_DIR = Path(__file__).resolve().parent.parent / "embedtrain" / "assets" / "demo-data"

# Generic English so the tokenizer learns common words even without the demo data,
# and so text outside the demo domain does not fall apart into single bytes.
BUILTIN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A retrieval model maps queries and passages into the same vector space.",
    "Given a question, find the passage that answers it.",
    "She opened the window and looked at the rain falling on the street.",
    "The committee will publish its report next week after a long review.",
    "Researchers measured the temperature of the water every hour for a month.",
    "He said that the train would arrive at seven in the evening.",
    "Most of the houses in the village were built of stone and wood.",
    "The results show a clear improvement over the previous method.",
    "Please read the instructions carefully before you start the test.",
    "We walked along the river until the sun went down behind the hills.",
    "The museum holds paintings, sculptures and old maps of the region.",
    "Scientists believe the new drug reduces the risk of heart disease.",
    "The city council approved the budget for new schools and roads.",
    "My grandmother told us stories about the war and her childhood.",
    "This document describes how to install and configure the software.",
    "The team won the final match with a goal in the last minute.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The author wrote three novels and a collection of short poems.",
    "Is it true that the earth moves around the sun once every year?",
    "What is the capital of the country and how many people live there?",
    "Who discovered the cell, and when was it first described?",
    "The company reported higher profits in the second quarter.",
    "They were happy, sad, angry, afraid, surprised and in love all at once.",
    "Instruct: Given a web search query, retrieve relevant passages that answer the query",
    "Query: how long does it take to learn to play the piano",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 and 3.14 appear in text.",
    'Punctuation matters: commas, periods. Questions? Exclamations! (Parentheses) and "quotes".',
]
BUILTIN_WORDS = """
the of and to in is was for on that with as by at from it his an were are which this be
or has had not their but first one its new after who they have her she two been other
when there all during into school time may years more most only over city some world
would where later up such used many can state about national out known university united
then made these him states three well long also between both under high part people
american may government before called year being through since like great house include
however south life city area work north team each area number same county east season
found took several following while group family series second new west river four age
water music film book show place word name day man woman child country world hand life
small large good bad old young right left big little best better different important
public general early late major local able every last own around even much still back
way thing think know take see come make find give tell ask work seem feel try leave call
question answer passage document query search retrieve relevant claim evidence support
refute true false science study result method data model paper experiment cell protein
disease effect treatment patient health cause increase decrease level risk brain heart
happy sad angry afraid surprise love joy fear anger sadness feeling emotion text label
red green blue yellow black white orange purple brown grey colour color light dark
morning evening night today tomorrow yesterday week month year hour minute second
car train ship plane road bridge street town village market shop bank office hospital
""".split()

SPECIAL_TOKENS = [BOS, EOS]


def demo_texts(corpus_dir: Path) -> list[str]:
    """All passages, queries and instructions of a dataset in embed-nemotron layout."""
    texts: list[str] = []
    if not corpus_dir.is_dir():
        return texts
    # Sorted so the training input, and hence the learned merges, are reproducible.
    for subset_dir in sorted(path for path in corpus_dir.iterdir() if path.is_dir()):
        metadata_path = subset_dir / "dataset_metadata.json"
        if metadata_path.exists():
            metadata = json.loads(metadata_path.read_text())
            texts += [metadata.get("query_instruction", ""), metadata.get("passage_instruction", "")]
        if (subset_dir / "corpus.parquet").exists():
            texts += pq.read_table(subset_dir / "corpus.parquet", columns=["text"])["text"].to_pylist()
        if (subset_dir / "queries.parquet").exists():
            texts += pq.read_table(subset_dir / "queries.parquet", columns=["question"])["question"].to_pylist()
    return [text for text in texts if text]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # Llama 3 does not add a leading space, so " word" and "word" stay distinct tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Leave room for the special tokens, which are appended after the merges
        # (Llama 3 also keeps them at the end of its vocabulary).
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        # All 256 byte symbols, so any input string can be encoded without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)

    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        # Deliberately no pad_token: Llama ships without one.
        model_max_length=MAX_POSITIONS,
        # Keep decode(encode(x)) == x; the cleanup would glue "word ." into "word.".
        clean_up_tokenization_spaces=False,
    )


def make_tiny_llama(
    out_dir,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    corpus_dir=None,
    texts: list[str] | None = None,
) -> Path:
    """Write tokenizer and random LlamaForCausalLM to ``out_dir`` and return it as a Path.

    ``texts`` replaces the demo dataset as tokenizer training text; the built-in
    English list is always added so the vocabulary is never degenerate.
    """
    out_dir = Path(out_dir)
    if texts is None:
        texts = demo_texts(Path(corpus_dir) if corpus_dir is not None else DEFAULT_CORPUS_DIR)
    training_texts = list(texts) + BUILTIN_SENTENCES + BUILTIN_WORDS
    tokenizer = train_tokenizer(training_texts, vocab_size)

    config = LlamaConfig(
        # len() rather than vocab_size: a small corpus may yield fewer merges than asked.
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # transformers 5 records its internal class name ("TokenizersBackend"), which 4.x
    # cannot resolve; Llama 3 checkpoints say "PreTrainedTokenizerFast", which both
    # versions load as the same fast tokenizer.
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random Llama model and tokenizer.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=None,
        help=f"dataset in embed-nemotron layout to train the tokenizer on (default: {DEFAULT_CORPUS_DIR})",
    )
    args = parser.parse_args()
    out_dir = make_tiny_llama(
        args.out_dir,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
        corpus_dir=args.corpus_dir,
    )
    for path in sorted(out_dir.iterdir()):
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
