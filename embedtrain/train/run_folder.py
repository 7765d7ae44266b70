"""A failed `embedtrain train` leaves no empty run folder behind: the command remembers whether the
run folder existed before the run and, when the run fails before its first checkpoint, removes the
folder it created (and the parents it created, if they are then empty).

Only a folder this run created is removed, so a user's files are never touched: a folder that
already existed (a resume, a folder the user made, one holding their files) is left as it is, and so
is any folder that holds a checkpoint (a started or finished step folder: the run got that far, and
its state is the user's to resume or inspect). Rank 0 alone removes, after the error; the other
ranks of a launch are failing with it.
"""

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from embedtrain.train.checkpoint import checkpoint_root


def created_folders(folder):
    """The folders that do not exist yet on the way to `folder`, deepest first (what mkdir -p would
    create), so that what a run creates can be told from what was there."""
    folder = Path(folder).absolute()
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def holds_checkpoint(run_dir):
    """Whether a run folder holds a checkpoint step folder, complete or not (step_N, step_N.partial)."""
    root = checkpoint_root(run_dir)
    return root.is_dir() and any(path.name.startswith("step_") for path in root.iterdir())


def remove_created(folders):
    """Remove the run folder of `folders` (created_folders' list, the run folder first) with what
    the run wrote in it, then each created parent that is left empty. Returns the folder removed,
    or None when there was nothing to remove or it holds a checkpoint."""
    if not folders or not folders[0].is_dir() or holds_checkpoint(folders[0]):
        return None
    shutil.rmtree(folders[0], ignore_errors=True)
    for parent in folders[1:]:
        try:
            parent.rmdir()  # only if empty: another run or the user may have put something there
        except OSError:
            break
    return folders[0]


@contextmanager
def removed_if_failed(run_dir):
    """Run the block; if it raises (any error, a crash or an interrupt) before the run's first
    checkpoint and the run folder `run_dir` did not exist when it began, rank 0 removes it (and the
    parents the run created, if empty) and says so on stderr, then the error goes on."""
    folders = created_folders(run_dir)
    try:
        yield
    except BaseException:
        if folders and os.environ.get("RANK", "0") == "0":  # set by every launcher, even before init
            removed = remove_created(folders)
            if removed is not None:
                print(
                    f"embedtrain: removed {run_dir}: this run created it and failed before its first checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
        raise
