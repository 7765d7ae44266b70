"""Mining memory benchmark: peak host memory of `embedtrain mine` against corpus size.

    python tools/bench_mine.py --out /tmp/bench_mine          # corpora of 20k and 200k documents, ~3 minutes

1. Writes two synthetic subsets in the dataset's layout whose corpora differ 10x in size (short
   documents of 10 made-up words) and that share the same queries (each with one positive among the
   first documents, so the queries are valid for both).
2. Runs `embedtrain mine` with the tiny model (embedtrain/assets/tiny-llama) on each, in a fresh
   process, on the CPU: peak RSS from the kernel (wait4's ru_maxrss, which includes file pages
   mapped by the process), peak private memory (RssAnon, sampled every 20 ms), wall time.
3. Prints a Markdown table and checks that the two peak RSS values differ by less than 100 MiB.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DOC_REF = pa.struct([("id", pa.string())])
SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("corpus_id", pa.string()),
        ("pos_doc", pa.list_(DOC_REF)),
        ("neg_doc", pa.list_(DOC_REF)),
    ]
)
LIMIT_MIB = 100


def words(rng, count):
    syllables = ["ka", "lo", "mi", "ren", "sto", "vu", "dar", "bel", "qui", "nor", "tes", "pha"]
    return [rng.choice(syllables) + rng.choice(syllables) + rng.choice(syllables) for _ in range(count)]


def write_subset(folder, documents, queries, seed=0):
    """One subset: `documents` short texts, `queries` queries whose positive is document i * 7."""
    rng = random.Random(seed)
    vocabulary = words(rng, 3000)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(rng.choices(vocabulary, k=10)) for _ in range(documents)]
    pq.write_table(pa.table({"id": [f"d_{i}" for i in range(documents)], "text": texts}), folder / "corpus.parquet")
    query_rng = random.Random(seed + 1)  # the same queries whatever the corpus size
    rows = []
    for i in range(queries):
        positive = (i * 7) % min(documents, 20_000)
        query_words = texts[positive].split()[:5]
        rows.append(
            {
                "question_id": f"q_{i}",
                "question": " ".join(query_rng.sample(query_words, 4)),
                "corpus_id": "Bench",
                "pos_doc": [{"id": f"d_{positive}"}],
                "neg_doc": [],
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), folder / "queries.parquet")
    (folder / "dataset_metadata.json").write_text(
        json.dumps(
            {
                "corpus_id": "Bench",
                "class": "TextQADataset",
                "query_instruction": "Instruct: find the document\nQuery:",
                "passage_instruction": "",
                "task_type": "Retrieval",
                "ids_only": False,
            }
        )
    )


def status_kib(pid):
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def run_mine(model, data, out, extra):
    """(peak RSS MiB, peak RssAnon MiB, seconds) of one `embedtrain mine` process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "embedtrain.cli", "mine", str(model), str(data), str(out), *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status_kib(process.pid).get("RssAnon", 0))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    watcher.join()
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return usage.ru_maxrss / 1024, peak_anon[0] / 1024, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="20000,200000", help="Corpus sizes (documents), comma-separated.")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--model", type=Path, default=REPO / "embedtrain" / "assets" / "tiny-llama")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    extra = ["--top-k", "20", "--batch-size", str(args.batch_size), "--device", "cpu"]
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        data = args.out / f"data-{size}"
        if not (data / "Bench" / "queries.parquet").is_file():
            write_subset(data / "Bench", size, args.queries)
        mined = args.out / f"mined-{size}"
        shutil.rmtree(mined, ignore_errors=True)
        rss, anon, seconds = run_mine(args.model, data, mined, extra)
        negatives = pq.read_table(mined / "Bench" / "queries.parquet").column("neg_doc").to_pylist()
        assert all(len(n) == 20 for n in negatives), "every query gets 20 negatives"
        rows.append((size, rss, anon, seconds))
        print(f"{size} documents: peak RSS {rss:.1f} MiB, peak private {anon:.1f} MiB, {seconds:.1f} s", flush=True)
    print(f"\ncommand: embedtrain mine {args.model.name} DATA OUT {' '.join(extra)}  ({args.queries} queries)\n")
    print("| corpus documents | peak RSS | peak private (RssAnon) | wall time |")
    print("| ---: | ---: | ---: | ---: |")
    for size, rss, anon, seconds in rows:
        print(f"| {size:,} | {rss:.1f} MiB | {anon:.1f} MiB | {seconds:.1f} s |")
    spread = max(r[1] for r in rows) - min(r[1] for r in rows)
    print(f"\npeak RSS spread: {spread:.1f} MiB (limit {LIMIT_MIB} MiB)")
    if spread >= LIMIT_MIB:
        raise SystemExit(f"peak RSS differs by {spread:.1f} MiB >= {LIMIT_MIB} MiB")


if __name__ == "__main__":
    main()
