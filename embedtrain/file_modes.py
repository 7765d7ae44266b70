"""Permissions of what embedtrain publishes (exports, merged models, checkpoints): those of the user's
umask, as `cp` or `torch.save` would give, so that a model exported into a shared cluster folder is
readable by the group the user chose.

Some writers create files owner-only: safetensors' `save_file` (0.8) writes 0600 whatever the umask,
and `shutil.copy` carries such a mode along. Each writer therefore calls `apply_umask` once on its
folder, before the rename that publishes it.
"""

import os
import stat
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
