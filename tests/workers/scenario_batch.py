"""Several scenarios of one worker in one process-group launch.

    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --scenarios batch.json

batch.json is a list of {"out": path, "args": [...]}: each entry runs as `WORKER --out PATH ARGS...`
would, one after another, in the same processes. Run as a script itself, this module runs entries of
several workers in one launch, each entry naming its own ({"worker": "lora_parity.py", ...}; the
worker's `scenario_entry` function runs it): tests/conftest.py's `scenario_launch` puts every test
file's scenarios of one world size into such a launch.

    torchrun --standalone --nproc_per_node 2 tests/workers/scenario_batch.py --scenarios batch.json
 A launch (torchrun, importing torch, transformers,
DeepSpeed and embedtrain on every rank, gloo's rendezvous) costs about 8 s on 2 CPU cores, the
scenario itself about 1 s; tests/conftest.py's run_scenarios writes the file and reads the results.

A scenario must leave nothing behind that changes the next one's numbers. This module restores
what a fresh process would start with (torch's, Python's and numpy's RNG states as they were before
the first scenario) and releases what the last one built (torch.compile's caches, garbage); the
worker undoes its own monkeypatches (try/finally) and destroys its DeepSpeed engine.
"""

import gc
import importlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from embedtrain import distributed


def scenarios_file(argv):
    """The path after --scenarios, or None (a single run: `argv` is the worker's own arguments)."""
    if "--scenarios" not in argv:
        return None
    index = argv.index("--scenarios")
    if len(argv) != 2 or index != 0:
        raise SystemExit("--scenarios FILE takes no other arguments (each scenario's are in FILE)")
    return argv[1]


def rng_states():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def set_rng_states(states):
    torch_state, cuda_state, python_state, numpy_state = states
    torch.set_rng_state(torch_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def release():
    """Free what a scenario built before the next starts: compiled graphs (dynamo keys its cache on
    code objects that every scenario shares) and the engine's cycles."""
    torch._dynamo.reset()
    gc.collect()


def run(run_one, argv=None):
    """`run_one(argv)` once with the command line's arguments, or once per scenario of the file
    given by --scenarios, with `--out` and that scenario's arguments, from the same RNG state (an
    entry naming another "worker" runs that worker's `scenario_entry` instead of `run_one`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = scenarios_file(argv)
    if path is None:
        run_one(argv)
        return
    scenarios = json.loads(Path(path).read_text())
    distributed.init_distributed()
    start = rng_states()
    for scenario in scenarios:
        set_rng_states(start)
        entry = worker_entry(scenario["worker"]) if "worker" in scenario else run_one
        entry(["--out", scenario["out"], *map(str, scenario["args"])])
        release()
        distributed.barrier()


def worker_entry(name):
    """The `scenario_entry(argv)` of worker script `name` (e.g. "grad_parity.py"), imported from
    this folder (the script's folder is first on sys.path)."""
    return importlib.import_module(Path(name).stem).scenario_entry


def refuse_single_run(argv):
    raise SystemExit("scenario_batch.py runs --scenarios FILE whose entries each name their worker")


if __name__ == "__main__":
    run(refuse_single_run)
    distributed.shutdown()
