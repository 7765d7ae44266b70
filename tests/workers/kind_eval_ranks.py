"""`embedtrain eval` and `mine` of a multi-vector (ColBERT) and a sparse (SPLADE) model on several
ranks, for tests/test_eval_kinds.py, which runs the same calls in one process and compares: N ranks
must give the result of one (eval.py and token_retrieval.py shard encoding by blocks and search by
query chunks on grids that depend on the sizes only).

    torchrun --standalone --nproc_per_node 2 tests/workers/kind_eval_ranks.py --out r.json

Rank 0 first writes, beside --out, the untrained models (the tiny Llama with a seeded projection, and
as a sparse model with its own LM head) and a small held-out set; the result names that folder.
"""

import argparse
import importlib.util
import json
import string
from pathlib import Path

import pyarrow.parquet as pq
import torch

from embedtrain import distributed
from embedtrain.eval import evaluate
from embedtrain.export_multi_vector import export_multi_vector
from embedtrain.export_sparse import export_sparse
from embedtrain.mine import mine
from embedtrain.model.encoder import load_backbone
from embedtrain.model.multi_vector import MultiVectorEncoder, MultiVectorSettings
from embedtrain.model.sparse import SparseModel, load_lm_head

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "embedtrain" / "assets" / "tiny-llama"
SUBSETS = ("FEVER", "SciFact", "SyntheticClassificationData")
# small blocks and chunks: every rank encodes and scores a share of every subset
SMALL = {"batch_size": 4, "query_chunk": 7, "device": "cpu"}


def build(root):
    """The two untrained exports and a held-out set (20 queries per subset) under `root`."""
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "tools" / "make_demo_data.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.make_demo_data(root / "heldout", seed=1, queries_per_subset=20)
    backbone = load_backbone(TINY)
    torch.manual_seed(0)
    module = MultiVectorEncoder(backbone, dim=16).eval()
    expansion = {"length": 24, "attend": True}
    settings = MultiVectorSettings(dim=16, query_expansion=expansion, skiplist_words=list(string.punctuation))
    export_multi_vector(module.state_dict(), TINY, root / "multi_vector", settings)
    backbone = load_backbone(TINY)
    export_sparse(SparseModel(backbone, load_lm_head(TINY, backbone)).eval().state_dict(), TINY, root / "sparse")


def evaluations(root, work):
    """{name: result} of every call, on rank 0 (None elsewhere); every rank calls it."""
    models, heldout = root / "multi_vector", root / "heldout"
    found = {
        "multi_vector": evaluate(models, heldout, **SMALL),
        "sparse": evaluate(root / "sparse", heldout, **SMALL),
        "first_stage": evaluate(models, heldout, first_stage="bm25", first_stage_k=5, **SMALL),
        "mined": mine(models, heldout, work / "mined", top_k=3, storage="float32", **SMALL),
    }
    if distributed.rank() != 0:
        return None
    found["negatives"] = {
        subset: pq.read_table(work / "mined" / subset / "queries.parquet").column("neg_doc").to_pylist()
        for subset in SUBSETS
    }
    return found


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    distributed.init_distributed()
    root = Path(args.out).parent
    if distributed.rank() == 0:
        build(root)
    distributed.barrier()
    found = evaluations(root, root / "work")
    if distributed.rank() == 0:
        Path(args.out).write_text(json.dumps({"root": str(root), "world": distributed.world_size(), **found}))


scenario_entry = main  # what tests/workers/scenario_batch.py runs for an entry naming this worker

if __name__ == "__main__":
    main()
