"""Prepare and restoration benchmark: prepare's rate per subset and worker, and restoration memory
against source size.

    python tools/bench_prepare.py --out /tmp/bench_prepare            # about 3 GB of files there

1. Prepare rate: one subset in the embed-nemotron layout (queries of ~12 words, documents of ~120
   words, 2.5 documents per query as in the full dataset, 1 positive + 8 negatives), prepared by
   one worker in a fresh process. The full dataset (3.66M queries, 9.1M documents, 14 subsets) is
   estimated from that rate.
2. Restoration: an ids_only subset (loader "mteb") that uses the same rows of sources padded to two
   sizes, restored in a fresh process from a local copy (streamed). Reports seconds, source rows/s
   and peak memory, split into private (anonymous) and file-backed pages.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_data import memory_kib, synthetic_text  # noqa: E402
from bench_export import sample_peak  # noqa: E402
from make_miniature import QUERIES_SCHEMA, dataset_card  # noqa: E402

FULL_QUERIES, FULL_DOCS, FULL_SUBSETS = 3_660_000, 9_100_000, 14
CHUNK = 100_000


def metadata(name, ids_only):
    return {
        "corpus_id": name,
        "class": "TextQADataset",
        "query_instruction": "Instruct: Retrieve passages\nQuery:",
        "passage_instruction": "",
        "task_type": "Retrieval",
        "ids_only": ids_only,
    }


def query_table(rng, questions, doc_ids, name):
    n = len(questions)
    picks = rng.integers(0, len(doc_ids), (n, 9))
    return pa.Table.from_pylist(
        [
            {
                "question_id": f"{name}-{i}",
                "question": questions[i],
                "corpus_id": name,
                "pos_doc": [{"id": doc_ids[picks[i, 0]]}],
                "neg_doc": [{"id": doc_ids[j]} for j in picks[i, 1:]],
            }
            for i in range(n)
        ],
        schema=QUERIES_SCHEMA,
    )


def write_text_subset(root, queries, seed=0):
    rng, name = np.random.default_rng(seed), "TextSubset"
    folder = Path(root) / "dataset" / name
    folder.mkdir(parents=True, exist_ok=True)
    docs = int(queries * 2.5)
    with pq.ParquetWriter(folder / "corpus.parquet", pa.schema([("id", pa.string()), ("text", pa.string())])) as w:
        for start in range(0, docs, CHUNK):
            n = min(CHUNK, docs - start)
            w.write_table(
                pa.table({"id": [f"d_{i}" for i in range(start, start + n)], "text": synthetic_text(rng, n, 120)})
            )
    doc_ids = [f"d_{i}" for i in range(docs)]
    pq.write_table(query_table(rng, synthetic_text(rng, queries, 12), doc_ids, name), folder / "queries.parquet")
    (folder / "dataset_metadata.json").write_text(json.dumps(metadata(name, False)))
    return folder.parent, docs


def write_source(root, rows, seed=0):
    """An mteb-style local source: configs queries and corpus, `rows` rows each."""
    rng, folder = np.random.default_rng(seed), Path(root) / "sources" / "bench" / "source"
    for config, words in (("queries", 12), ("corpus", 120)):
        path = folder / config / f"{config}-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(path, pa.schema([("_id", pa.string()), ("text", pa.string())])) as writer:
            for start in range(0, rows, CHUNK):  # row groups of CHUNK rows, as sources usually have
                n = min(CHUNK, rows - start)
                ids = [f"{config}-{i}" for i in range(start, start + n)]
                writer.write_table(pa.table({"_id": ids, "text": synthetic_text(rng, n, words)}), CHUNK)
    (folder / "README.md").write_text(dataset_card({c: {c: f"{c}/*.parquet"} for c in ("queries", "corpus")}))


def write_ids_only_subset(root, queries, docs, smallest_source, seed=1):
    """The subset names rows below `smallest_source`, so it is the same subset for every source size."""
    rng, name = np.random.default_rng(seed), "IdsOnly"
    folder = Path(root) / "dataset" / name
    folder.mkdir(parents=True, exist_ok=True)
    q_rows = np.sort(rng.choice(smallest_source, queries, replace=False))
    d_rows = np.sort(rng.choice(smallest_source, docs, replace=False))
    doc_ids = [f"d_{r}" for r in d_rows]
    pq.write_table(pa.table({"id": doc_ids}), folder / "corpus.parquet")
    pq.write_table(query_table(rng, [f"q_{r}" for r in q_rows], doc_ids, name), folder / "queries.parquet")
    (folder / "dataset_metadata.json").write_text(json.dumps(metadata(name, True)))
    (folder / "source_config.json").write_text(json.dumps({"loader_config": "mteb", "source_repo": "bench/source"}))
    return folder


def child(task, args):
    """Run in a fresh process: one prepare (timed) or one restoration (timed, with peak memory)."""
    from embedtrain.data.prepare import prepare
    from embedtrain.data.restore import restore_subset

    start = time.perf_counter()
    if task == "prepare":  # the subset is prepared in a worker process: time only
        prepare(args[0], args[1], workers=1)
        print(json.dumps({"seconds": time.perf_counter() - start}))
        return

    def restore():
        _, problems = restore_subset(Path(args[0]), Path(args[1]), sources=args[2])
        assert not problems, problems[:3]

    result = sample_peak(restore)  # peak VmRSS / RssAnon / RssFile sampled every 20 ms, MiB
    result["peak_mib"]["VmHWM"] = round(memory_kib()["VmHWM"] / 1024, 1)
    print(json.dumps(result))


def run_child(*args):
    env_free = [sys.executable, __file__, "--child", *map(str, args)]
    result = subprocess.run(env_free, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_prepare"))
    parser.add_argument("--queries", type=int, default=100_000, help="queries of the prepare-rate subset")
    parser.add_argument("--source-rows", type=int, nargs=2, default=[200_000, 2_000_000])
    parser.add_argument("--used", type=int, nargs=2, default=[20_000, 50_000], help="queries and docs restored")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    shutil.rmtree(args.out, ignore_errors=True)
    report = {}
    root = args.out / "rate"
    dataset, docs = write_text_subset(root, args.queries)
    result = run_child("prepare", dataset, root / "out")
    rate = args.queries / result["seconds"]
    report["prepare"] = {
        "queries": args.queries,
        "docs": docs,
        **result,
        "queries_per_s": rate,
        "docs_per_s": docs / result["seconds"],
        "full_dataset_hours_1_worker": FULL_QUERIES / rate / 3600,
    }
    report["restore"] = []
    for rows in args.source_rows:
        root = args.out / f"source-{rows}"
        write_source(root, rows)
        folder = write_ids_only_subset(root, *args.used, smallest_source=min(args.source_rows))
        source_bytes = sum(p.stat().st_size for p in (root / "sources").rglob("*.parquet"))
        result = run_child("restore", folder, root / "restored", root / "sources")
        report["restore"].append(
            {
                "source_rows": rows,
                "source_parquet_mb": source_bytes / 2**20,
                "used_queries": args.used[0],
                "used_docs": args.used[1],
                **result,
                "source_rows_per_s": 2 * rows / result["seconds"],
            }
        )
        shutil.rmtree(root)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
