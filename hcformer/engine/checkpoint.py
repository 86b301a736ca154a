"""Atomic checkpoints: ``checkpoints/last.pt`` and the one before it, ``prev.pt``.

A checkpoint is written to a temporary name in the same folder, flushed to disk (fsync) and
renamed over ``last.pt`` (``os.replace`` is atomic on POSIX); the old ``last.pt`` is first
hard-linked to ``prev.pt``, so a ``last.pt`` exists at every moment once one was written. The new
file is complete before anything is renamed: a write that fails (disk full, quota, file-size
limit) removes its partial file, leaves both checkpoints as they were and says so.
Files are read with ``torch.load(weights_only=True)``: only tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from hcformer.errors import HCFormerError
from hcformer.runfolder import LAST_CHECKPOINT, PREV_CHECKPOINT


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _WriteErrors:
    """A file for ``torch.save`` that remembers the OS error of a failed write: torch's writer
    turns it into a RuntimeError that does not say what happened (disk full, quota, size limit)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _write_temporary(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary name beside ``path``, flushed to disk; on a failed write
    (disk full, over quota, RLIMIT_FSIZE) the partial file is removed and the error says so."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            sink = _WriteErrors(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        kept = f"; {path} is unchanged" if path.exists() else ""
        raise HCFormerError(
            f"{path}: could not write the checkpoint ({exc.strerror or exc}; disk full, over quota "
            f"or a file-size limit?){kept}"
        ) from None
    return tmp


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temporary(obj, path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def save_checkpoint(state: dict[str, Any], ckpt_dir: str | Path) -> Path:
    """Write ``state`` as ``ckpt_dir/last.pt``, keeping the previous one as ``prev.pt``.

    The new file is complete on disk before anything is renamed, so a failed write leaves both
    ``last.pt`` and ``prev.pt`` as they were."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last, prev = ckpt_dir / LAST_CHECKPOINT, ckpt_dir / PREV_CHECKPOINT
    tmp = _write_temporary(state, last)
    if last.exists():
        link = ckpt_dir / f".{PREV_CHECKPOINT}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.link(last, link)
        os.replace(link, prev)
    os.replace(tmp, last)
    _fsync_dir(ckpt_dir)
    return last


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HCFormerError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # unpickling errors have many types
        raise HCFormerError(
            f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})"
        ) from None


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """``last.pt`` if present, else ``prev.pt`` (a crash between two renames), else None."""
    for name in (LAST_CHECKPOINT, PREV_CHECKPOINT):
        path = Path(ckpt_dir) / name
        if path.is_file():
            return path
    return None
