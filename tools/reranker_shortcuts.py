"""python tools/reranker_shortcuts.py OUT [--steps 300] [--heldout 300] [--inbatch 4]

Does a reranker trained only against lexically mined hard negatives learn a shortcut ("the
passage that shares fewer words with the query is the relevant one")? And do in-batch negatives
(loss.negatives=local, loss.inbatch_negatives) stop it? Tried as a new user would, on real text
that is on this machine without a network:

1. The data: the installed Python packages' metadata (query: a distribution's `Summary:` line,
   positive: the first prose paragraph of its description) and the module docstrings of the
   standard library and site-packages (query: the docstring's summary line, positive: its first
   paragraph after it). Queries are split into training and held-out ones by a hash of their
   source name; the training corpus holds the training queries' passages only.
2. Hard negatives mined with TF-IDF (scikit-learn): the passages most similar to the query other
   than its positive, written in the embed-nemotron dataset layout (docs/data.md) under OUT/data.
3. The tiny reranker (recipe tiny_reranker, CPU) trained for --steps steps twice, with the group
   loss only and with in-batch negatives, each exported (`embedtrain train`, `embedtrain export`).
4. On the held-out queries, each model's rate of ranking the positive first (a) among its mined
   negatives (chance 1/4 with 3), (b) among random passages (chance 1/4), and (c) nDCG@10 when it
   reranks a TF-IDF first stage's top 20 over the whole corpus, beside TF-IDF's own.

Writes OUT/results.json and prints a markdown table. docs/benchmarks.md records a run.
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_data import write_subset  # noqa: E402  (the one writer of the dataset layout)

MINED = 3  # mined negatives per held-out query in (a), as the recipe trains with (loss.hard_negatives)
FIRST_STAGE = 20  # TF-IDF candidates reranked in (c)
MAX_WORDS = 80  # passages cut to this many words (the recipe's pair_max_length is 128 tokens)
PROSE_WORD = re.compile(r"^[(\"'`]*[A-Za-z][A-Za-z'-]*[)\"'`]*[.,;:!?]?$")  # a plain word, not markup
SKIP_LINE = re.compile(r"^\s*(\.\. |\[!|!\[|<|#|=+$|-+$|\*+$|~+$|\|)")


def words(text, limit=MAX_WORDS):
    return " ".join(text.split()[:limit])


def first_paragraph(text, min_words=12):
    """The first paragraph of prose in `text`: blank-line separated, skipping headings, badges,
    directives and HTML; None when there is none of at least `min_words` words."""
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip() and not SKIP_LINE.match(line)]
        paragraph = " ".join(line.strip() for line in lines)
        tokens = paragraph.split()
        prose = sum(bool(PROSE_WORD.match(token)) for token in tokens)
        if len(tokens) >= min_words and prose >= 0.8 * len(tokens) and "://" not in paragraph:
            if not paragraph.lower().startswith(("copyright", "license")):
                return words(paragraph)
    return None


def package_pairs():
    """(source name, query, passage) from each installed distribution's Summary and description."""
    seen = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if not name or name in seen:
            continue
        seen.add(name)
        summary = " ".join((dist.metadata.get("Summary") or "").split())
        description = dist.metadata.get("Description") or dist.metadata.get_payload() or ""
        passage = first_paragraph(description)
        if len(summary.split()) >= 3 and passage:
            yield f"pkg:{name}", summary, passage


DOCSTRING = re.compile(r'\A\s*(?:#[^\n]*\n\s*)*[rRuU]?("""|\'\'\')(.*?)\1', re.DOTALL)


def docstring_pairs():
    """(source name, query, passage) from module docstrings: the summary line, then the first
    paragraph after it. Tests, vendored and generated modules are left out."""
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            parts = set(path.relative_to(root).parts[:-1])
            if parts & {"tests", "test", "testing", "idle_test", "_vendor", "vendor", "site-packages", "dist-packages"}:
                continue  # the standard library's walk leaves site-packages to its own
            try:
                head = path.read_text(encoding="utf-8", errors="strict")[:6000]
            except (UnicodeDecodeError, OSError):
                continue
            match = DOCSTRING.match(head)
            if not match:
                continue
            text = match.group(2).strip()
            summary, _, rest = text.partition("\n")
            summary = " ".join(summary.split()).rstrip(".")
            passage = first_paragraph(rest)
            if 4 <= len(summary.split()) <= 30 and passage and "generated" not in summary.lower():
                yield f"mod:{path.relative_to(root)}", summary, passage


def collect(limit):
    """Unique (name, query, passage) rows, at most `limit` (packages first, then docstrings in a
    hash order): a query or a passage seen before is skipped."""
    rows, queries, passages = [], set(), set()
    docstrings = sorted(docstring_pairs(), key=lambda row: stable_hash(row[0]))
    for name, query, passage in [*package_pairs(), *docstrings]:
        if query.lower() in queries or passage in passages:
            continue
        queries.add(query.lower())
        passages.add(passage)
        rows.append((name, query, passage))
        if len(rows) == limit:
            break
    return rows


def stable_hash(text):
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def tfidf(corpus):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english")
    return vectorizer, vectorizer.fit_transform(corpus)


def rank_by_tfidf(vectorizer, matrix, queries):
    """(queries x documents) cosine scores (TfidfVectorizer rows are unit vectors)."""
    return (vectorizer.transform(queries) @ matrix.T).toarray()


def mined_negatives(scores_QN, positives_Q, count):
    """The `count` highest-scoring documents of each query other than its positive."""
    order_QN = np.argsort(-scores_QN, axis=1, kind="stable")
    return [[int(d) for d in row if d != positive][:count] for row, positive in zip(order_QN, positives_Q)]


def write_dataset(out, rows, negatives=8):
    """The training queries in the embed-nemotron layout: OUT/<subset>/{dataset_metadata.json,
    corpus.parquet, queries.parquet}, one subset, TF-IDF negatives among the training passages."""
    passages = [passage for _, _, passage in rows]
    vectorizer, matrix = tfidf(passages)
    mined = mined_negatives(rank_by_tfidf(vectorizer, matrix, [q for _, q, _ in rows]), range(len(rows)), negatives)
    corpus = [{"id": f"d_{i}", "text": text} for i, text in enumerate(passages)]
    queries = [
        {
            "question_id": f"q_{i}",
            "question": query,
            "corpus_id": "PythonDocs",
            "pos_doc": [{"id": f"d_{i}"}],
            "neg_doc": [{"id": f"d_{d}"} for d in mined[i]],
        }
        for i, (_, query, _) in enumerate(rows)
    ]
    write_subset(Path(out), "PythonDocs", corpus, queries, {"query_instruction": "", "task_type": "Retrieval"})


def embedtrain(*args):
    command = [sys.executable, "-m", "embedtrain.cli", *map(str, args)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def train_and_export(out, name, data, steps, overrides):
    run, model = Path(out) / "runs" / name, Path(out) / "models" / name
    for folder in (run, model):  # a rerun starts over (train would resume, export refuses a full folder)
        shutil.rmtree(folder, ignore_errors=True)
    sets = [f"data.path={data}", f"train.max_steps={steps}", f"train.save_every={steps}", *overrides]
    started = time.time()
    log = embedtrain(
        "train", "--config", "tiny_reranker", "--output-dir", run, *[a for s in sets for a in ("--set", s)]
    )
    (run / "train.log").write_text(log)  # the logged loss and accuracies (accuracy_inbatch under local)
    minutes = (time.time() - started) / 60
    embedtrain("export", run, model)
    return model, minutes


def evaluate(model_dir, heldout, corpus, seed=0):
    """(a), (b), (c) of the module docstring for one exported reranker on the held-out rows:
    `heldout` [(query, index of its positive in `corpus`)], `corpus` every passage."""
    from embedtrain.inference.api import Reranker

    reranker = Reranker.from_pretrained(model_dir)
    vectorizer, matrix = tfidf(corpus)
    queries, positives = [q for q, _ in heldout], [p for _, p in heldout]
    scores_QN = rank_by_tfidf(vectorizer, matrix, queries)
    mined = mined_negatives(scores_QN, positives, MINED)
    rng = np.random.default_rng(seed)
    first_stage = np.argsort(-scores_QN, axis=1, kind="stable")[:, :FIRST_STAGE]
    wins_mined = wins_random = 0
    ndcg_first = ndcg_reranked = 0.0
    for (query, positive), negatives, candidates in zip(heldout, mined, first_stage):
        others = [int(d) for d in rng.choice(len(corpus), MINED + 1, replace=False) if d != positive][:MINED]
        scored = reranker.score(query, [corpus[d] for d in [positive, *negatives, *others]])
        wins_mined += bool(scored[0] > max(scored[1 : 1 + MINED]))
        wins_random += bool(scored[0] > max(scored[1 + MINED :]))
        candidates = [int(d) for d in candidates]
        reranked = [candidates[i] for i in np.argsort(-reranker.score(query, [corpus[d] for d in candidates]))]
        ndcg_first += ndcg_at_10(candidates, positive)
        ndcg_reranked += ndcg_at_10(reranked, positive)
    n = len(heldout)
    return {
        "positive_over_mined": wins_mined / n,
        "positive_over_random": wins_random / n,
        "ndcg10_tfidf": ndcg_first / n,
        "ndcg10_reranked": ndcg_reranked / n,
    }


def ndcg_at_10(ranking, positive):
    """nDCG@10 with one relevant document: 1 / log2(1 + its rank) within the top 10, else 0."""
    rank = ranking.index(positive) + 1 if positive in ranking[:10] else 0
    return 1.0 / math.log2(1 + rank) if rank else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each reranker")
    parser.add_argument("--heldout", type=int, default=300, help="held-out queries")
    parser.add_argument("--limit", type=int, default=4000, help="queries in all (training + held-out)")
    parser.add_argument("--inbatch", type=int, default=4, help="loss.inbatch_negatives of the second run")
    args = parser.parse_args()

    rows = collect(args.limit)
    order = sorted(range(len(rows)), key=lambda i: stable_hash("heldout:" + rows[i][0]))
    heldout_ids = set(order[: args.heldout])
    train_rows = [row for i, row in enumerate(rows) if i not in heldout_ids]
    heldout_rows = [row for i, row in enumerate(rows) if i in heldout_ids]
    write_dataset(args.out / "data", train_rows)
    corpus = [passage for _, _, passage in rows]
    heldout = [(query, i) for i, (_, query, _) in enumerate(rows) if i in heldout_ids]
    print(
        f"{len(rows)} queries ({sum(r[0].startswith('pkg:') for r in rows)} package summaries): "
        f"{len(train_rows)} training, {len(heldout_rows)} held out; corpus {len(corpus)} passages"
    )

    runs = {
        "group (hard negatives only)": ["loss.negatives=group"],
        f"local, {args.inbatch} in-batch negatives": ["loss.negatives=local", f"loss.inbatch_negatives={args.inbatch}"],
    }
    results = {}
    for label, overrides in runs.items():
        name = "group" if overrides[0].endswith("group") else "local"
        model, minutes = train_and_export(args.out, name, args.out / "data", args.steps, overrides)
        results[label] = {**evaluate(model, heldout, corpus), "train_minutes": round(minutes, 1)}
        print(label, json.dumps(results[label]))
    summary = {"queries": len(rows), "training": len(train_rows), "heldout": len(heldout), "steps": args.steps}
    (args.out / "results.json").write_text(json.dumps({**summary, "runs": results}, indent=1) + "\n")
    print(
        "\n| loss | positive over 3 mined negatives | over 3 random passages | nDCG@10 reranking TF-IDF top 20 |"
        " train minutes |\n| --- | ---: | ---: | ---: | ---: |"
    )
    first = next(iter(results.values()))["ndcg10_tfidf"]
    print(f"| TF-IDF first stage alone | | | {first:.3f} | |")
    for label, r in results.items():
        print(
            f"| {label} | {r['positive_over_mined']:.3f} | {r['positive_over_random']:.3f} | "
            f"{r['ndcg10_reranked']:.3f} | {r['train_minutes']} |"
        )


if __name__ == "__main__":
    main()
