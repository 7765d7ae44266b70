"""python tools/make_demo_data.py embedtrain/assets/demo-data [--seed 0] [--queries-per-subset 400]

Generate a small synthetic retrieval/classification dataset laid out exactly like
``nvidia/embed-nemotron-dataset-v1``::

    OUT_DIR/<Subset>/dataset_metadata.json
    OUT_DIR/<Subset>/corpus.parquet    # id: string ("d_<i>"), text: string
    OUT_DIR/<Subset>/queries.parquet   # question_id, question, corpus_id,
                                       # pos_doc: list<struct<id>>, neg_doc: list<struct<id>>

The content is made up but learnable: every query names an invented entity and one
of its attributes, the positive passage is the only one about that entity, and the
hard negatives are passages about other entities that share words with the query.
A tiny randomly initialised model can therefore pick up the signal from token
overlap alone, which is what the smoke tests and the demo training run need.

Output is fully determined by ``--seed`` (Python's ``random`` seeded with a string
is stable across runs and platforms).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Explicit schemas so the files match the real dataset even when a column is empty.
DOC_REF = pa.struct([("id", pa.string())])
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
QUERIES_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("corpus_id", pa.string()),
        ("pos_doc", pa.list_(DOC_REF)),
        ("neg_doc", pa.list_(DOC_REF)),
    ]
)

METADATA = {
    "FEVER": {
        "query_instruction": ("Instruct: Given a claim, retrieve documents that support or refute the claim\nQuery:"),
        "task_type": "Retrieval",
    },
    "SciFact": {
        "query_instruction": (
            "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery:"
        ),
        "task_type": "Retrieval",
    },
    "SyntheticClassificationData": {
        "query_instruction": "Instruct: Classify the sentiment of the given text\nQuery:",
        "task_type": "Classification",
    },
}

# Fewer/more hard negatives per query than the usual 4, so loaders must handle both.
MIN_NEGATIVES = 2
MAX_NEGATIVES = 6

SYLLABLES = [
    "ka",
    "lo",
    "ven",
    "dru",
    "mi",
    "sor",
    "tal",
    "ne",
    "qui",
    "bra",
    "zel",
    "fo",
    "ri",
    "tu",
    "gan",
    "mor",
    "pe",
    "shi",
    "va",
    "dor",
    "lin",
    "ex",
    "ul",
    "cas",
    "tir",
    "om",
    "bel",
    "nau",
    "ryn",
    "sa",
    "vek",
    "ju",
    "hal",
    "ost",
    "pri",
    "mek",
]

# Attribute value pools are deliberately small so that many entities share values:
# that is what makes the hard negatives hard.
FEVER_ATTRIBUTES = {
    "place": [
        "Lisbon",
        "Oslo",
        "Nairobi",
        "Lima",
        "Osaka",
        "Quebec",
        "Dublin",
        "Krakow",
        "Perth",
        "Cusco",
        "Tbilisi",
        "Hanoi",
        "Porto",
        "Tunis",
        "Bergen",
        "Quito",
    ],
    "profession": [
        "painter",
        "sculptor",
        "architect",
        "violinist",
        "chemist",
        "sailor",
        "poet",
        "botanist",
        "astronomer",
        "blacksmith",
        "weaver",
        "cartographer",
        "surgeon",
        "novelist",
        "engineer",
        "glassblower",
    ],
    "material": [
        "bronze",
        "marble",
        "oak",
        "silk",
        "glass",
        "copper",
        "clay",
        "granite",
        "linen",
        "silver",
        "cedar",
        "porcelain",
    ],
    "colour": [
        "crimson",
        "amber",
        "teal",
        "violet",
        "ochre",
        "indigo",
        "emerald",
        "scarlet",
        "cobalt",
        "saffron",
    ],
    "year": [str(year) for year in range(1780, 1960, 7)],
}

SCIFACT_ATTRIBUTES = {
    "kind": [
        "small molecule inhibitor",
        "peptide hormone",
        "bacterial enzyme",
        "protein kinase",
        "transcription factor",
        "membrane transporter",
        "antibody fragment",
        "plant alkaloid",
    ],
    "organism": [
        "mice",
        "rats",
        "zebrafish",
        "human cell lines",
        "yeast",
        "fruit flies",
        "pigs",
        "nematodes",
    ],
    "tissue": [
        "liver",
        "kidney",
        "retina",
        "lung",
        "heart",
        "skin",
        "bone marrow",
        "pancreas",
        "intestine",
        "brain",
    ],
    "effect": ["increases", "reduces", "blocks", "activates"],
    "process": [
        "apoptosis",
        "inflammation",
        "insulin secretion",
        "cell migration",
        "DNA repair",
        "collagen synthesis",
        "fat storage",
        "neuron growth",
        "iron uptake",
        "autophagy",
    ],
    "year": [str(year) for year in range(1988, 2024, 3)],
}
COMPOUND_SUFFIXES = ["mycin", "statin", "ase", "zole", "ine", "tide", "mab", "olin"]
OPPOSITE_EFFECT = {
    "increases": "reduces",
    "reduces": "increases",
    "blocks": "activates",
    "activates": "blocks",
}

EMOTION_WORDS = {
    "joy": ["joyful", "happy", "delighted", "thrilled", "cheerful", "overjoyed", "glad", "ecstatic"],
    "sadness": ["sad", "heartbroken", "gloomy", "miserable", "tearful", "lonely", "sorrowful", "devastated"],
    "anger": ["angry", "furious", "irritated", "outraged", "annoyed", "livid", "enraged", "resentful"],
    "fear": ["afraid", "scared", "terrified", "anxious", "nervous", "frightened", "panicked", "fearful"],
    "surprise": ["surprised", "amazed", "astonished", "shocked", "stunned", "startled", "speechless", "baffled"],
    "love": ["loving", "adoring", "affectionate", "devoted", "tender", "smitten", "cherished", "fond"],
}
# Hardest-first order of wrong labels for each label (emotions that are easily confused).
CONFUSABLE_LABELS = {
    "joy": ["love", "surprise", "sadness", "fear", "anger"],
    "sadness": ["fear", "anger", "love", "surprise", "joy"],
    "anger": ["sadness", "fear", "surprise", "joy", "love"],
    "fear": ["surprise", "sadness", "anger", "joy", "love"],
    "surprise": ["joy", "fear", "anger", "love", "sadness"],
    "love": ["joy", "sadness", "surprise", "fear", "anger"],
}
SUBJECTS = ["I", "We", "My sister", "Our team", "The old man", "She", "He", "My friend", "The kids"]
INTENSIFIERS = ["so", "really", "truly", "incredibly", "quite", "deeply", "completely"]
CONTEXTS = [
    "when the letter arrived",
    "after the meeting ended",
    "at the news about the harbour",
    "while reading the report",
    "during the long train ride",
    "when the lights went out",
    "after the phone call",
    "as the results were announced",
    "when the guests came in",
    "on the first day of school",
    "after seeing the old photographs",
    "when the storm reached the village",
]


def article(word: str) -> str:
    """'a' or 'an' in front of a word; every word used here follows the vowel rule."""
    return f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def make_name(rng: random.Random, syllable_count: int) -> str:
    return "".join(rng.sample(SYLLABLES, syllable_count)).capitalize()


def unique_names(rng: random.Random, count: int, build) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        name = build(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def random_entities(rng: random.Random, names: list[str], attributes: dict) -> list[dict]:
    return [{"name": name, **{key: rng.choice(values) for key, values in attributes.items()}} for name in names]


def rank_hard_negatives(
    rng: random.Random,
    positive: dict,
    stated: tuple[str, str],
    candidates: list[dict],
    attribute_keys: list[str],
) -> list[dict]:
    """Order candidate entities hardest first.

    A candidate is hard when it carries the attribute value the query states (so the
    passage contains the query's words), shares other attributes with the positive,
    or shares the first part of the positive's name. The random term breaks ties.
    """
    stated_key, stated_value = stated

    def hardness(entity: dict) -> float:
        score = 3.0 * (entity[stated_key] == stated_value)
        score += sum(entity[key] == positive[key] for key in attribute_keys)
        score += 2.0 * (positive["first"] is not None and entity["first"] == positive["first"])
        return score + rng.random()

    others = [entity for entity in candidates if entity is not positive]
    return sorted(others, key=hardness, reverse=True)


def assign_doc_ids(rng: random.Random, entities: list[dict], text_of) -> list[dict]:
    """Shuffle passages so ids carry no information, then number them d_0..d_{n-1}."""
    order = list(entities)
    rng.shuffle(order)
    corpus = []
    for index, entity in enumerate(order):
        entity["doc_id"] = f"d_{index}"
        corpus.append({"id": entity["doc_id"], "text": text_of(entity)})
    return corpus


def fever_passage(entity: dict) -> str:
    name = entity["name"]
    return (
        f"{name}. {name} (born {entity['year']} in {entity['place']}) is {article(entity['profession'])} "
        f"best known for works made of {entity['material']}. Critics often describe the "
        f"{entity['colour']} finish that {name.split()[-1]} applied to almost every piece."
    )


def fever_claim(rng: random.Random, entity: dict, key: str, value: str) -> str:
    name = entity["name"]
    templates = {
        "place": [f"{name} was born in {value}.", f"{name} comes from {value}."],
        "profession": [f"{name} is {article(value)}.", f"{name} worked as {article(value)}."],
        "material": [f"{name} is known for works made of {value}.", f"{name} worked mainly with {value}."],
        "colour": [f"{name} gave most works {article(value)} finish.", f"The works of {name} are {value}."],
        "year": [f"{name} was born in {value}.", f"{name} was born in the year {value}."],
    }
    return rng.choice(templates[key])


def scifact_passage(entity: dict) -> str:
    name = entity["name"]
    return (
        f"{name} is {article(entity['kind'])} first characterised in {entity['year']}. "
        f"Experiments in {entity['organism']} show that {name} {entity['effect']} "
        f"{entity['process']} in the {entity['tissue']}, an effect that disappears when "
        f"the {entity['kind']} is removed."
    )


def scifact_claim(rng: random.Random, entity: dict, key: str, value: str) -> str:
    name = entity["name"]
    templates = {
        "kind": [f"{name} is {article(value)}.", f"{name} belongs to the class of {value}s."],
        "organism": [f"{name} has measurable effects in {value}.", f"{name} was studied in {value}."],
        "tissue": [f"{name} acts on the {value}.", f"{name} has its main effect in the {value}."],
        "effect": [
            f"{name} {value} {entity['process']}.",
            f"In {entity['organism']}, {name} {value} {entity['process']}.",
        ],
        "process": [f"{name} changes {value}.", f"{name} influences {value} in {entity['organism']}."],
        "year": [f"{name} was first described in {value}.", f"{name} has been known since {value}."],
    }
    return rng.choice(templates[key])


def entity_counts(queries_per_subset: int) -> tuple[int, int]:
    """Entities that queries point at (two queries each) and the total incl. ~10% distractors."""
    queried_count = max(8, math.ceil(queries_per_subset / 2))
    return queried_count, queried_count + max(2, queried_count // 10)


def entity_queries(
    rng: random.Random,
    subset: str,
    queries_per_subset: int,
    attributes: dict,
    names: list[str],
    first_names: list[str | None],
    passage_of,
    claim_of,
    refute,
) -> tuple[list[dict], list[dict]]:
    """Shared recipe for the claim-retrieval subsets (FEVER, SciFact)."""
    queried_count, _ = entity_counts(queries_per_subset)
    entities = random_entities(rng, names, attributes)
    for entity, first in zip(entities, first_names):
        entity["first"] = first
    queried, distractors = entities[:queried_count], entities[queried_count:]

    corpus = assign_doc_ids(rng, entities, passage_of)

    # Two queries per entity, about different attributes.
    queries = []
    for entity in queried:
        for key in rng.sample(sorted(attributes), 2):
            value = entity[key]
            # About a third of the claims are false, as in FEVER: the passage about the
            # entity still refutes them, so it stays the positive.
            if rng.random() < 0.3:
                value = refute(rng, key, value)
            negatives = rank_hard_negatives(rng, entity, (key, value), queried, list(attributes))
            negative_count = rng.randint(MIN_NEGATIVES, MAX_NEGATIVES)
            queries.append(
                {
                    "question": claim_of(rng, entity, key, value),
                    "corpus_id": subset,
                    "pos_doc": [{"id": entity["doc_id"]}],
                    "neg_doc": [{"id": other["doc_id"]} for other in negatives[:negative_count]],
                }
            )
    rng.shuffle(queries)
    queries = queries[:queries_per_subset]
    for index, query in enumerate(queries):
        query["question_id"] = f"q_{index}"
    assert distractors, "every subset should contain passages no query points at"
    return corpus, queries


def make_fever(rng: random.Random, queries_per_subset: int) -> tuple[list[dict], list[dict]]:
    _, total = entity_counts(queries_per_subset)
    # A small pool of first names, so several people share one: "Kalo Venmi" vs "Kalo Drusor".
    first_pool = unique_names(rng, max(4, total // 6), lambda r: make_name(r, 2))
    firsts = [rng.choice(first_pool) for _ in range(total)]
    surnames = unique_names(rng, total, lambda r: make_name(r, r.choice([2, 3])))
    names = [f"{first} {surname}" for first, surname in zip(firsts, surnames)]

    def refute(rng: random.Random, key: str, value: str) -> str:
        return rng.choice([other for other in FEVER_ATTRIBUTES[key] if other != value])

    return entity_queries(
        rng,
        "FEVER",
        queries_per_subset,
        FEVER_ATTRIBUTES,
        names,
        firsts,
        fever_passage,
        fever_claim,
        refute,
    )


def make_scifact(rng: random.Random, queries_per_subset: int) -> tuple[list[dict], list[dict]]:
    _, total = entity_counts(queries_per_subset)
    names = unique_names(rng, total, lambda r: make_name(r, r.choice([1, 2])) + r.choice(COMPOUND_SUFFIXES))

    def refute(rng: random.Random, key: str, value: str) -> str:
        # Contradicting the direction of the effect is the classic SciFact refutation.
        if key == "effect":
            return OPPOSITE_EFFECT[value]
        return rng.choice([other for other in SCIFACT_ATTRIBUTES[key] if other != value])

    return entity_queries(
        rng,
        "SciFact",
        queries_per_subset,
        SCIFACT_ATTRIBUTES,
        names,
        [None] * total,
        scifact_passage,
        scifact_claim,
        refute,
    )


def make_classification(rng: random.Random, query_count: int) -> tuple[list[dict], list[dict]]:
    subset = "SyntheticClassificationData"
    labels = list(EMOTION_WORDS)
    # The label names themselves are the passages, as in the real classification subsets.
    corpus = [{"id": f"d_{index}", "text": label} for index, label in enumerate(labels)]
    doc_id_of = {label: f"d_{index}" for index, label in enumerate(labels)}

    queries = []
    for index in range(query_count):
        label = labels[index % len(labels)]
        word = rng.choice(EMOTION_WORDS[label])
        text = f"{rng.choice(SUBJECTS)} felt {rng.choice(INTENSIFIERS)} {word} {rng.choice(CONTEXTS)}."
        # Sometimes a second cue, sometimes the label word itself, so the task is
        # easy enough for a tiny model but not a single fixed pattern.
        if rng.random() < 0.5:
            text += f" It was {rng.choice(EMOTION_WORDS[label])}, honestly."
        if rng.random() < 0.4:
            text += f" Pure {label}."
        negative_count = rng.randint(MIN_NEGATIVES, len(labels) - 1)
        queries.append(
            {
                "question": text,
                "corpus_id": subset,
                "pos_doc": [{"id": doc_id_of[label]}],
                "neg_doc": [{"id": doc_id_of[other]} for other in CONFUSABLE_LABELS[label][:negative_count]],
            }
        )
    rng.shuffle(queries)
    for index, query in enumerate(queries):
        query["question_id"] = f"q_{index}"
    return corpus, queries


def write_subset(out_dir: Path, subset: str, corpus: list[dict], queries: list[dict], info=None) -> None:
    """OUT/<subset> in the embed-nemotron layout: dataset_metadata.json, corpus.parquet (id, text) and
    queries.parquet (question_id, question, corpus_id, pos_doc, neg_doc). `info`: the subset's
    query_instruction and task_type (default: the demo subset's, METADATA). Other tools that write
    the layout (tools/reranker_shortcuts.py) call this writer."""
    subset_dir = Path(out_dir) / subset
    subset_dir.mkdir(parents=True, exist_ok=True)
    info = METADATA[subset] if info is None else info
    metadata = {
        "corpus_id": subset,
        "class": "TextQADataset",
        "query_instruction": info["query_instruction"],
        "passage_instruction": "",
        "task_type": info["task_type"],
        "ids_only": False,
    }
    (subset_dir / "dataset_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    pq.write_table(pa.Table.from_pylist(corpus, schema=CORPUS_SCHEMA), subset_dir / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(queries, schema=QUERIES_SCHEMA), subset_dir / "queries.parquet")


def make_demo_data(out_dir, seed: int = 0, queries_per_subset: int = 400) -> Path:
    """Write the three demo subsets under ``out_dir`` and return it as a Path."""
    out_dir = Path(out_dir)
    # One generator per subset, seeded by name, so changing one subset's recipe
    # does not reshuffle the others.
    builders = {
        "FEVER": lambda rng: make_fever(rng, queries_per_subset),
        "SciFact": lambda rng: make_scifact(rng, queries_per_subset),
        "SyntheticClassificationData": lambda rng: make_classification(rng, max(1, queries_per_subset // 2)),
    }
    for subset, build in builders.items():
        rng = random.Random(f"{seed}:{subset}")
        corpus, queries = build(rng)
        write_subset(out_dir, subset, corpus, queries)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--queries-per-subset",
        type=int,
        default=400,
        help="queries for FEVER and SciFact; the classification subset gets half",
    )
    args = parser.parse_args()
    out_dir = make_demo_data(args.out_dir, seed=args.seed, queries_per_subset=args.queries_per_subset)
    for path in sorted(out_dir.rglob("*")):
        if path.is_file():
            print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
