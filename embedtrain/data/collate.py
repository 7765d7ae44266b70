"""Examples -> token batches: prompt (embedtrain.prompts) + text, separate max lengths for the
query and passage sides, padding to a multiple of 8."""

import torch
from transformers import AutoTokenizer

from embedtrain.data.nemotron import content_hash
from embedtrain.model.encoder import ModelError
from embedtrain.prompts import training_policy


def load_tokenizer(path, padding_side="right"):
    """The checkpoint's tokenizer with a pad token: Llama has none, training uses eos as pad."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model.path: the tokenizer in {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


class Collator:
    """Tokenises a list of Examples into a query batch and a passage batch.

    Returns a dict: query_ids/query_mask (Q, Lq), passage_ids/passage_mask (Q*G, Lp) with each
    query's passages contiguous (positive first), positive_hash (Q,), passage_hash (Q*G,).
    """

    def __init__(self, tokenizer, data_config, subsets):
        """`subsets`: name -> {"query_instruction", "passage_instruction"} (the prepared manifest's)."""
        self.tokenizer = tokenizer
        self.config = data_config
        self.policy = training_policy(data_config, subsets)
        self.subset_prompts = {name: self.policy.for_subset(info) for name, info in subsets.items()}

    def tokenize(self, texts, max_length):
        return self.tokenizer(texts, max_length=max_length, truncation=True, padding=True,
                              pad_to_multiple_of=self.config.pad_to_multiple_of, return_tensors="pt")

    def __call__(self, examples):
        queries = [self.subset_prompts[e.subset][0] + e.query for e in examples]
        passages = [self.subset_prompts[e.subset][1] + p for e in examples for p in e.passages]
        q = self.tokenize(queries, self.config.query_max_length)
        p = self.tokenize(passages, self.config.passage_max_length)
        return {
            "query_ids": q["input_ids"], "query_mask": q["attention_mask"],
            "passage_ids": p["input_ids"], "passage_mask": p["attention_mask"],
            "positive_hash": torch.tensor([content_hash(e.passages[0]) for e in examples], dtype=torch.long),
            "passage_hash": torch.tensor([content_hash(p) for e in examples for p in e.passages], dtype=torch.long),
        }
