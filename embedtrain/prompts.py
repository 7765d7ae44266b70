"""Prompts: the one place that decides which text goes in front of a query or a document.

A model is trained either with fixed prefixes for every subset (the Llama-3.2-1B recipe: "query:" /
"passage:") or with each subset's own instructions from its dataset_metadata.json
(`query_instruction`, `passage_instruction`: the llama-embed-nemotron-8b recipe). The choice is made
per side by `data.query_prefix` / `data.passage_prefix`: a string is that prefix for every subset,
None means the subset's instruction. A prompt is joined to its text with one space.

The choice travels with the model (`<run>/base_model/prompts.json`, `embedtrain.json` in exports),
so that training, in-training eval, `embedtrain eval`, `mine` and `encode` all put the same text in
front of the same kind of input. `default_query` / `default_document` are the prompts for text that
comes without a subset (encode, BEIR folders): the configured prefix, else the first training
subset's instruction; exports write them as the sentence-transformers prompts.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL_METADATA = "embedtrain.json"


def joined(prompt):
    """The prompt as it is put in front of a text: with its one-space joiner; "" for no prompt."""
    return f"{prompt} " if prompt else ""


@dataclass(frozen=True)
class PromptPolicy:
    """Which prompt each side gets. Prefixes and instructions are stored without the joiner;
    the defaults (and everything this class returns) carry it."""

    query_prefix: str | None = None  # None: the subset's query_instruction
    passage_prefix: str | None = None  # None: the subset's passage_instruction
    default_query: str = ""
    default_document: str = ""

    @property
    def source(self):
        """ "prefix" when queries get one fixed prompt, "instruction" when each subset has its own."""
        return "prefix" if self.query_prefix is not None else "instruction"

    def for_subset(self, metadata=None):
        """(query prompt, document prompt) for a subset's dataset_metadata (None: no subset)."""
        if metadata is None:
            return self.default_query, self.default_document
        query = self.query_prefix if self.query_prefix is not None else metadata.get("query_instruction", "")
        document = self.passage_prefix if self.passage_prefix is not None else metadata.get("passage_instruction", "")
        return joined(query), joined(document)

    def named(self, name):
        """The prompt behind a sentence-transformers prompt name ("query" or "document")."""
        prompts = self.sentence_transformers_prompts()
        if name not in prompts:
            raise KeyError(f"prompt {name!r}: expected one of {', '.join(prompts)}")
        return prompts[name]

    def sentence_transformers_prompts(self):
        return {"query": self.default_query, "document": self.default_document}

    def to_dict(self):
        return {"prompt_source": self.source, **asdict(self)}

    @classmethod
    def from_dict(cls, data):
        return cls(
            **{key: data[key] for key in ("query_prefix", "passage_prefix", "default_query", "default_document")}
        )


def training_policy(data_config, subsets):
    """The policy of a training run: `data_config` holds query_prefix / passage_prefix, `subsets`
    maps subset name -> metadata (query_instruction, passage_instruction), in training order."""
    partial = PromptPolicy(data_config.query_prefix, data_config.passage_prefix)
    first = next(iter(subsets.values()), None)
    query, document = partial.for_subset(first if first is not None else {})
    return PromptPolicy(data_config.query_prefix, data_config.passage_prefix, query, document)


def model_policy(model_dir):
    """The policy recorded with an exported model (or a run's base_model folder). A folder without
    the record uses its sentence-transformers prompts for every subset (a prefix model), and one
    with no prompts at all (a base checkpoint) each subset's instructions."""
    model_dir = Path(model_dir)
    recorded = {}
    for name in (MODEL_METADATA, "prompts.json"):
        if (model_dir / name).is_file():
            recorded = json.loads((model_dir / name).read_text())
            if "query_prefix" in recorded:
                return PromptPolicy.from_dict(recorded)
            break
    st_config = model_dir / "config_sentence_transformers.json"
    prompts = json.loads(st_config.read_text()).get("prompts", {}) if st_config.is_file() else {}
    query, document = prompts.get("query", ""), prompts.get("document", "")
    if recorded.get("prompt_source") == "instruction" or not (recorded or prompts):
        # recorded as instruction-trained, or nothing recorded at all (a base checkpoint):
        # each subset's own instructions, as the dataset defines them
        return PromptPolicy(None, None, query, document)
    return PromptPolicy(query.rstrip(" "), document.rstrip(" "), query, document)
