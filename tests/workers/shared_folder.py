"""A run folder that is not shared, and raw data prepared once, on 2 ranks.

    torchrun --standalone --nproc_per_node 2 tests/workers/shared_folder.py --out r.json --root ROOT

1. Training with a different --output-dir on each rank (ROOT/rank<R>, as a node-local folder would
   be on each node of a hostfile launch) must stop in set-up, before the engine and step 1, with
   the ConfigError that names the ranks and hosts that do not see the folder.
2. The same check on one folder (ROOT/shared) passes on every rank and returns one token.
3. Raw data (the demo data) is prepared into ROOT/shared/prepared by exactly one rank under the
   file lock, with no collective between the ranks while it runs (loop.prepare_once).
Rank 0 writes what each rank saw.
"""

import argparse
import json
import os
from pathlib import Path

from embedtrain import distributed
from embedtrain.config import load_config
from embedtrain.errors import ConfigError
from embedtrain.train import loop


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    root = Path(args.root)
    distributed.SHARED_CHECK_DELAYS = (0.1,)  # a rank that does not see the file re-reads once, briefly
    rank = int(os.environ["RANK"])
    config = load_config("tiny", ["train.max_steps=1"], output_dir=str(root / f"rank{rank}"))
    built = []
    real_build = loop.build_engine
    loop.build_engine = lambda *a, **k: built.append(1) or real_build(*a, **k)
    try:
        loop.train(config)
        error = None
    except ConfigError as err:
        error = str(err)
    finally:
        loop.build_engine = real_build

    shared = root / "shared"
    if distributed.rank() == 0:
        shared.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    token = distributed.check_shared_folder(shared)

    prepared = []
    real_prepare = loop.prepare
    loop.prepare = lambda *a, **k: prepared.append(1) or real_prepare(*a, **k)
    try:
        loop.prepare_once(Path(config.data.path), shared / "prepared", None, token)
    finally:
        loop.prepare = real_prepare
    every = distributed.all_gather_object(
        {"error": error, "engine_built": bool(built), "token": token, "prepared": len(prepared)}
    )
    if distributed.rank() == 0:
        manifest = (shared / "prepared" / "manifest.json").is_file()
        Path(args.out).write_text(json.dumps({"ranks": every, "manifest": manifest}, indent=2))


if __name__ == "__main__":
    main()
    distributed.shutdown()
