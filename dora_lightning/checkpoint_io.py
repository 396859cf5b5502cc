"""Checkpoint writes that are atomic on the checkpoint's own filesystem and leave nothing behind when killed.

Lightning's default writer buffers the whole checkpoint in memory, writes it to a temporary file in ``$TMPDIR`` and
moves it into place: across filesystems that move is a copy (not atomic), and a process killed mid-write leaves a
partial file in ``$TMPDIR`` that nothing removes. :class:`AtomicCheckpointIO` writes next to the target
(``.<name>.tmp-<pid>-<token>``), flushes it to disk and renames it over the target, so a reader sees the old
checkpoint or the new one, never a part; temporary files of writers that are no longer running are removed the first
time a folder is written to.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_MARKER = ".tmp-"


def temp_path_for(target: Path) -> Path:
    """The temporary file a write of ``target`` goes through: hidden, in the same folder, naming the writer's pid."""
    return target.with_name(f".{target.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def _writer_pid(name: str) -> int | None:
    """The pid in a temporary file's name, or None when ``name`` is not one of ours."""
    if not name.startswith(".") or TEMP_MARKER not in name:
        return None
    pid, _, token = name.rpartition(TEMP_MARKER)[2].partition("-")
    return int(pid) if pid.isdigit() and token else None


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files in ``folder`` whose writer is no longer running; return what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        pid = _writer_pid(entry.name)
        if pid is None or pid == os.getpid() or _is_running(pid):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a filesystem that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_local(path: Any) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


def write_atomically(checkpoint: dict[str, Any], target: Path) -> None:
    """``torch.save`` ``checkpoint`` to ``target`` through a temporary file in its folder and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(target)
    try:
        with open(temp, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with atomic local writes (see the module docstring).

    Remote paths (``s3://``, ...) are left to Lightning's writer. `dora fit` installs this writer unless the trainer
    was given another ``CheckpointIO`` plugin.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (removing stale temporary files of the folder first)."""
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        if target.parent not in self._cleaned:
            remove_stale_temp_files(target.parent)
            self._cleaned.add(target.parent)
        write_atomically(checkpoint, target)
