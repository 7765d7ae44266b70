"""Permissions of what embedtrain publishes (exports, merged models, checkpoints): those of the user's
umask, as `cp` or `torch.save` would give, so that a model exported into a shared cluster folder is
readable by the group the user chose.

Some writers create files owner-only: safetensors' `save_file` (0.8) writes 0600 whatever the umask,
and `shutil.copy` carries such a mode along. Each writer therefore calls `apply_umask` once on its
folder, before the rename that publishes it.
"""

import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path


def current_umask():
    """The process's umask. Linux states it in /proc/self/status; elsewhere it is read by setting and
    restoring it (a brief window in which another thread would create files with umask 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder, umask=None):
    """Give `folder`, every folder under it 0o777 & ~umask and every file 0o666 & ~umask (0o777 &
    ~umask where the owner may execute it). Symbolic links are left alone. `umask`: default the
    process's. Files another user owns (not ours to chmod) keep their mode."""
    umask = current_umask() if umask is None else umask
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        executable = stat.S_ISDIR(info.st_mode) or info.st_mode & stat.S_IXUSR
        mode = (0o777 if executable else 0o666) & ~umask
        if stat.S_IMODE(info.st_mode) != mode:
            try:
                os.chmod(path, mode)
            except PermissionError:
                pass


@contextmanager
def published_folder(out, overwrite, replace_with="--overwrite"):
    """Write a folder that appears complete or not at all: yields `OUT.partial` (made empty) to write
    into; when the block ends, gives it the user's umask and renames it to `out` (replacing an
    existing `out`); when the block raises, removes it. An existing `out` without `overwrite` is a
    FileExistsError naming `replace_with` (the option or argument that allows it)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass {replace_with} to replace it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        apply_umask(tmp)  # safetensors writes 0600: a shared folder's users could not read the model
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
