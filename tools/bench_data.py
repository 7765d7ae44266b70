"""Data-path benchmark: reader memory against dataset size, and reader + tokenizer throughput.

    python tools/bench_data.py --out /tmp/bench_data            # writes 0.2 GB and 2 GB datasets there

1. Writes two prepared datasets (Arrow shards in the layout of embedtrain.data.shards) of about
   0.2 GB and 2 GB, two subsets each, synthetic text of realistic lengths.
2. For each, a fresh process streams global batches (128 queries x (1 + 4) passages, proportional
   mixing) for a fixed number of steps and reports peak RSS, split into private (anonymous) memory
   and file-backed pages of the memory-mapped shards.
3. Examples/s of reader + collate (tokenise both sides, pad to a multiple of 8) on one core.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedtrain.data.nemotron import content_hash  # noqa: E402
from embedtrain.data.shards import CORPUS_SCHEMA, FORMAT, MANIFEST, QUERY_SCHEMA, write_sharded  # noqa: E402

WORDS = np.array(
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no what "
    "up out who them some only its into time two may first then do any like my now over such "
    "our man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very "
    "make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right "
    "used take three".split()
)


def synthetic_text(rng, count, mean_words):
    lengths = np.clip(rng.poisson(mean_words, count), 3, None)
    words = WORDS[rng.integers(0, len(WORDS), lengths.sum())]
    cuts = np.cumsum(lengths)[:-1]
    return [" ".join(chunk) for chunk in np.split(words, cuts)]


def write_dataset(out, target_bytes, seed=0):
    """Two subsets; each query has 1 positive (doc 2i) and 8 negatives among its subset's documents."""
    rng = np.random.default_rng(seed)
    subsets = {}
    for name in ("SubsetA", "SubsetB"):
        docs = max(1000, int(target_bytes / 2 / 700))  # ~700 bytes a document (about 120 words)
        queries = docs // 2
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        texts = synthetic_text(rng, docs, 120)
        corpus = pa.table({"id": [f"d_{i}" for i in range(docs)], "text": texts}, schema=CORPUS_SCHEMA)
        question = synthetic_text(rng, queries, 12)
        negs = rng.integers(0, docs, (queries, 8))
        table = pa.table(
            {
                "question_id": [f"q_{i}" for i in range(queries)],
                "question": question,
                "corpus": [name] * queries,
                "positives": pa.array([[2 * i] for i in range(queries)], pa.list_(pa.int64())),
                "positive_hashes": pa.array(
                    [[content_hash(texts[2 * i])] for i in range(queries)], pa.list_(pa.int64())
                ),
                "negs": pa.array(list(negs), pa.list_(pa.int64())),
                "length": [len(q) + 700 for q in question],
            },
            schema=QUERY_SCHEMA,
        )
        subsets[name] = {
            "corpus_id": name,
            "query_instruction": "Instruct: Retrieve passages\nQuery:",
            "passage_instruction": "",
            "task_type": "Retrieval",
            "num_queries": queries,
            "num_docs": docs,
            "skipped_rows": 0,
            "corpus_shards": write_sharded(folder, "corpus", corpus, 256 << 20),
            "query_shards": write_sharded(folder, "queries", table, 256 << 20),
        }
    (Path(out) / MANIFEST).write_text(json.dumps({"format": FORMAT, "source": "synthetic", "subsets": subsets}))
    return sum(f.stat().st_size for f in Path(out).rglob("*.arrow"))


def memory_kib():
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def stream(folder, steps):
    """Run in a child process: stream `steps` global batches, report peak memory."""
    from embedtrain.data.shards import PreparedDataset
    from embedtrain.data.stream import Sampler, StepBatches

    dataset = PreparedDataset(folder)
    sampler = Sampler(dataset.subset_sizes(), 128, seed=0)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    for _ in StepBatches(dataset, sampler, lambda m: None, 0, 1, 128, 4, 0, steps):
        peak = {k: max(v, memory_kib()[k]) for k, v in peak.items()}
    elapsed = time.perf_counter() - start
    print(json.dumps({"peak_kib": peak, "examples_per_s": steps * 128 / elapsed}))


def collate_throughput(folder, steps):
    from embedtrain.config import load_config
    from embedtrain.data.collate import Collator
    from embedtrain.data.shards import PreparedDataset
    from embedtrain.data.stream import Sampler, StepBatches
    from embedtrain.model.encoder import load_tokenizer

    config = load_config("tiny", ["data.query_max_length=512", "data.passage_max_length=512"])
    dataset = PreparedDataset(folder)
    collator = Collator(load_tokenizer(config.model.path), config.data, dataset.info)
    sampler = Sampler(dataset.subset_sizes(), 128, seed=1)
    start = time.perf_counter()
    for _ in StepBatches(dataset, sampler, collator, 0, 1, 128, 4, 0, steps):
        pass
    return steps * 128 / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bench_data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stream(args.child, args.steps)
        return
    torch_threads = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    os.environ.update(torch_threads)
    results = {}
    for label, size in (("0.2GB", 0.2e9), ("2GB", 2e9)):
        folder = Path(args.out) / label
        manifest = folder / MANIFEST
        if not manifest.is_file() or json.loads(manifest.read_text()).get("format") != FORMAT:
            written = write_dataset(folder, size)
        else:
            written = sum(f.stat().st_size for f in folder.rglob("*.arrow"))
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **torch_threads},
        )
        results[label] = {"bytes": written, **json.loads(child.stdout.strip().splitlines()[-1])}
        print(label, json.dumps(results[label]), flush=True)
    rate = collate_throughput(Path(args.out) / "0.2GB", 20)
    results["reader_plus_collate_examples_per_s_one_core"] = rate
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
