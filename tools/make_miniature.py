"""python tools/make_miniature.py OUT [--queries 12] [--source-rows 0] [--seed 0]

A 14-subset miniature of nvidia/embed-nemotron-dataset-v1 with its ids_only subsets and their sources:

    OUT/dataset/<Subset>/            the dataset's layout: 3 subsets carry their text (FEVER,
                                     SyntheticClassificationData, MIRACL), 11 are ids_only with a
                                     source_config.json (loader "mteb" or "column")
    OUT/sources/<owner>/<name>/      each ids_only subset's source as a local `datasets` folder:
                                     parquet files and a README.md dataset card declaring its configs
    OUT/expected.json                for every query: its text and its passages' texts (positive
                                     first, then negatives) as the source rows say

The sources here are made up (repository names under `mini/`); the layout and the id rules are the
real ones (q_<i> / d_<i> are 0-based row positions in the source). `--source-rows N` pads every
source table to N rows with rows no subset uses, to measure restoration at two source sizes.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embedtrain.data.formats import QUERIES_FILE_SCHEMA as QUERIES_SCHEMA  # noqa: E402 (the layout's queries.parquet)

TEXT_SUBSETS = ("FEVER", "SyntheticClassificationData", "MIRACL")
MTEB_SUBSETS = ("HotpotQA", "MSMARCO", "NFCorpus", "NaturalQuestions", "SciFact", "TriviaQA")
COLUMN_SUBSETS = ("EmotionClassification", "GooAQ", "MAmmoTH2", "PAQ", "SQuAD")
WORDS = "amber basalt cedar delta ember fjord garnet harbor indigo juniper kelp lumen marrow nectar onyx".split()


def sentence(rng, n=8):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_parquet(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def dataset_card(configs):
    """A README.md whose YAML header declares configs -> {split: parquet glob}."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: {path}"]
    return "\n".join(lines + ["---", "", "A made-up source for embedtrain's tests.", ""])


def subset_files(folder, name, queries, corpus, ids_only, source=None):
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "corpus_id": name,
        "class": "TextQADataset",
        "query_instruction": f"Instruct: retrieve passages for {name}\nQuery:",
        "passage_instruction": "",
        "task_type": "Retrieval",
        "ids_only": ids_only,
    }
    (folder / "dataset_metadata.json").write_text(json.dumps(meta, indent=2))
    if source is not None:
        (folder / "source_config.json").write_text(json.dumps(source, indent=2))
    write_parquet(folder / "queries.parquet", pa.Table.from_pylist(queries, schema=QUERIES_SCHEMA))
    columns = {"id": [d[0] for d in corpus]}
    if not ids_only:  # an ids_only corpus lists its ids only
        columns["text"] = [d[1] for d in corpus]
    write_parquet(folder / "corpus.parquet", pa.table(columns))


def padded_rows(rng, used, source_rows):
    """Source row positions: the used ones spread over max(2 * used, source_rows) rows."""
    total = max(2 * used, source_rows)
    return sorted(rng.sample(range(total), used)), total


def query_rows(name, queries, docs):
    """(question_id, query index, positive doc index, negative doc indices) of every query."""
    return [(f"{name}-{q}", q, q % docs, [(q + k) % docs for k in (1, 2, 3)]) for q in range(queries)]


def text_subset(root, name, rng, queries, docs):
    texts = [f"{name} passage {i}: {sentence(rng)}" for i in range(docs)]
    corpus = [(f"d_{i}", t) for i, t in enumerate(texts)]
    rows, expected = [], {}
    for qid, q, pos, negs in query_rows(name, queries, docs):
        question = f"{name} question {q}: {sentence(rng, 5)}"
        rows.append(row(qid, question, name, [pos], negs))
        expected[qid] = [question, texts[pos], *[texts[n] for n in negs]]
    subset_files(root / "dataset" / name, name, rows, corpus, ids_only=False)
    return expected


def row(qid, question, corpus_id, positives, negatives):
    return {
        "question_id": qid,
        "question": question,
        "corpus_id": corpus_id,
        "pos_doc": [{"id": f"d_{p}"} for p in positives],
        "neg_doc": [{"id": f"d_{n}"} for n in negatives],
    }


def mteb_subset(root, name, rng, queries, docs, source_rows):
    repo = f"mini/{name.lower()}"
    q_rows, q_total = padded_rows(rng, queries, source_rows)
    d_rows, d_total = padded_rows(rng, docs, source_rows)
    q_text = {r: f"{name} source query row {r}: {sentence(rng, 5)}" for r in range(q_total)}
    d_text = {r: f"{name} source doc row {r}: {sentence(rng)}" for r in range(d_total)}
    folder = root / "sources" / repo
    for config, total, texts in (("queries", q_total, q_text), ("corpus", d_total, d_text)):
        write_parquet(
            folder / config / f"{config}-00000.parquet",
            pa.table({"_id": [f"{config}-{r}" for r in range(total)], "text": [texts[r] for r in range(total)]}),
        )
    (folder / "README.md").write_text(dataset_card({c: {c: f"{c}/*.parquet"} for c in ("queries", "corpus")}))
    # the subset lists its documents in another order than the source: ids, not positions, matter
    corpus = [(f"d_{d_rows[i]}", "") for i in rng.sample(range(docs), docs)]
    rows, expected = [], {}
    for qid, q, pos, negs in query_rows(name, queries, docs):
        rows.append(row(qid, f"q_{q_rows[q]}", name, [d_rows[pos]], [d_rows[n] for n in negs]))
        expected[qid] = [q_text[q_rows[q]], d_text[d_rows[pos]], *[d_text[d_rows[n]] for n in negs]]
    subset_files(root / "dataset" / name, name, rows, corpus, True, {"loader_config": "mteb", "source_repo": repo})
    return expected


def column_subset(root, name, rng, queries, docs, source_rows):
    repo = f"mini/{name.lower()}"
    used, total = padded_rows(rng, max(queries, docs), source_rows)
    questions = {r: f"{name} source question row {r}: {sentence(rng, 5)}" for r in range(total)}
    answers = {r: f"{name} source answer row {r}: {sentence(rng)}" for r in range(total)}
    folder = root / "sources" / repo
    write_parquet(
        folder / "pairs" / "train-00000.parquet",
        pa.table({"question": [questions[r] for r in range(total)], "answer": [answers[r] for r in range(total)]}),
    )
    (folder / "README.md").write_text(dataset_card({"pairs": {"train": "pairs/*.parquet"}}))
    corpus = [(f"d_{used[i]}", "") for i in range(docs)]
    rows, expected = [], {}
    for qid, q, pos, negs in query_rows(name, queries, docs):
        rows.append(row(qid, f"q_{used[q]}", name, [used[pos]], [used[n] for n in negs]))
        expected[qid] = [questions[used[q]], answers[used[pos]], *[answers[used[n]] for n in negs]]
    source = {
        "loader_config": "column",
        "source_repo": repo,
        "subset": "pairs",
        "split": "train",
        "query_column": "question",
        "document_column": "answer",
    }
    subset_files(root / "dataset" / name, name, rows, corpus, True, source)
    return expected


def write_miniature(out, queries=12, source_rows=0, seed=0, only=None):
    """Write the miniature (or the subsets named in `only`) under `out`; returns
    {subset: {question_id: [query, passages...]}}."""
    out, rng = Path(out), random.Random(f"miniature-{seed}")
    docs = queries + 4
    expected = {}
    for name in TEXT_SUBSETS:
        if only is None or name in only:
            expected[name] = text_subset(out, name, rng, queries, docs)
    for name in MTEB_SUBSETS:
        if only is None or name in only:
            expected[name] = mteb_subset(out, name, rng, queries, docs, source_rows)
    for name in COLUMN_SUBSETS:
        if only is None or name in only:
            expected[name] = column_subset(out, name, rng, queries, docs, source_rows)
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    return expected


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=12, help="queries per subset")
    parser.add_argument("--source-rows", type=int, default=0, help="pad every source table to this many rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_miniature(args.out, args.queries, args.source_rows, args.seed)
    print(f"wrote {args.out / 'dataset'} and its sources under {args.out / 'sources'}")


if __name__ == "__main__":
    main()
