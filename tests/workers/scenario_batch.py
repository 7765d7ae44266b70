"""Several scenarios of one worker in one process-group launch.

    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --scenarios batch.json

batch.json is a list of {"out": path, "args": [...]}: each entry runs as `WORKER --out PATH ARGS...`
would, one after another, in the same processes. A launch (torchrun, importing torch, transformers,
DeepSpeed and embedtrain on every rank, gloo's rendezvous) costs about 8 s on 2 CPU cores, the
scenario itself about 1 s; tests/conftest.py's run_scenarios writes the file and reads the results.

A scenario must leave nothing behind that changes the next one's numbers. This module restores
what a fresh process would start with (torch's, Python's and numpy's RNG states as they were before
the first scenario) and releases what the last one built (torch.compile's caches, garbage); the
worker undoes its own monkeypatches (try/finally) and destroys its DeepSpeed engine.
"""

import gc
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
    given by --scenarios, with `--out` and that scenario's arguments, from the same RNG state."""
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
        run_one(["--out", scenario["out"], *map(str, scenario["args"])])
        release()
        distributed.barrier()
