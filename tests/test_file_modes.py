"""What embedtrain publishes gets the user's umask, not the owner-only modes some writers use."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from embedtrain.file_modes import apply_umask, current_umask


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_current_umask_is_the_process_umask():
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
    finally:
        os.umask(old)
    assert current_umask() == old


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_apply_umask_opens_owner_only_files_as_far_as_the_umask_allows(tmp_path, umask, file_mode, folder_mode):
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))  # 0600 whatever the umask
    (folder / "1_Pooling" / "config.json").write_text("{}")
    os.chmod(folder / "1_Pooling" / "config.json", 0o600)
    os.chmod(folder / "1_Pooling", 0o700)
    (folder / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(folder / "run.sh", 0o700)
    (folder / "link").symlink_to("model.safetensors")
    assert mode(folder / "model.safetensors") == 0o600
    apply_umask(folder, umask)
    assert mode(folder / "model.safetensors") == file_mode
    assert mode(folder / "1_Pooling" / "config.json") == file_mode
    assert mode(folder / "1_Pooling") == folder_mode and mode(folder) == folder_mode
    assert mode(folder / "run.sh") == folder_mode  # the owner's execute bit is kept, within the umask
    assert os.path.islink(folder / "link")


def test_a_published_checkpoint_has_the_users_umask(tmp_path):
    """publish_checkpoint (rank 0, after every rank wrote) gives every file of step_N the umask's mode."""
    from embedtrain.train.checkpoint import publish_checkpoint

    run = tmp_path / "run"
    (run / "base_model").mkdir(parents=True)
    (run / "base_model" / "config.json").write_text("{}")
    partial = run / "checkpoints" / "step_2.partial"
    partial.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(partial / "adapter_model.safetensors"))  # written 0600
    os.chmod(partial, 0o700)
    old = os.umask(0o022)
    try:
        publish_checkpoint(run / "checkpoints", "step_2", run, {"step": 2}, {"model": {}})
    finally:
        os.umask(old)
    step = run / "checkpoints" / "step_2"
    modes = {path: mode(path) for path in [step, *step.rglob("*")]}
    assert len(modes) > 3 and modes == {path: 0o755 if path.is_dir() else 0o644 for path in modes}
