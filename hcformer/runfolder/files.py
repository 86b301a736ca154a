"""Reading and writing run-folder files: atomic writes, one JSON reader, a log's tail, the
commit of the code.

A file is written to a temporary name in its folder, flushed to disk and renamed over the old
one (``os.replace`` is atomic on POSIX), so a reader sees the old file or the new one, never a
part of one. Only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from hcformer.errors import HCFormerError

_ROOT = Path(__file__).resolve().parents[2]  # the project's checkout


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, fsync it, then rename it over ``path``
    (a failed write removes the temporary file and leaves ``path`` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, *, strict: bool = False) -> dict[str, Any] | None:
    """The JSON mapping at ``path``; None when it is absent, or (unless ``strict``) unreadable,
    half-written or not a mapping. ``strict``: a file that is there but not valid JSON is an
    error naming it (a finished file that should be whole)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:  # invalid JSON or text
        if strict:
            raise HCFormerError(f"{path}: not valid JSON ({exc})") from None
        return None
    except OSError:
        if strict:
            raise
        return None
    return data if isinstance(data, dict) else None


def last_line(path: str | Path, max_bytes: int = 65536) -> str:
    """The last non-empty line of a text file (reading at most its last ``max_bytes``)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - max_bytes, 0))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def log_tail(paths: list[Path], lines: int = 40) -> str:
    """The last ``lines`` lines of the first existing, non-empty file of ``paths``."""
    for path in paths:
        with contextlib.suppress(OSError):
            text = Path(path).read_text(errors="replace")
            if text.strip():
                return "\n".join(text.rstrip().splitlines()[-lines:])
    return "(no log output)"


def git_commit(cwd: str | Path | None = None) -> str:
    """The checked-out commit of the project (or of ``cwd``); ``unknown`` outside a git
    checkout or when git cannot be run."""
    try:
        out = subprocess.run(
            ["git", "-C", str(cwd or _ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
