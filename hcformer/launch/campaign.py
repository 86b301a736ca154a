"""Running the Snakemake campaign so that a restart after a crash costs nothing.

``hcformer campaign --profile slurm all_tables`` (:mod:`hcformer.commands.campaign`) runs ``snakemake --profile slurm all_tables``
(every argument passes through) after two repairs that only a dead campaign needs:

1. **Snakemake's lock.** A killed Snakemake leaves ``.snakemake/locks`` behind and the next one
   refuses to start. This command records itself (host, pid) in
   ``.snakemake/hcformer-campaign.json`` while Snakemake runs; when it finds the lock and that
   record names a process of this host that is gone, it runs ``snakemake --unlock`` first. A
   live holder, one on another host, or a lock without a record (a plain ``snakemake``) is never
   removed: it stops with one line saying who holds it and how to unlock by hand.
2. **Snakemake's incomplete markers.** Snakemake marks a rule's outputs incomplete when the rule
   starts and unmarks them when it sees the rule end. A run whose job finished while the login
   side was dead (or just before it died) has its ``metrics.json`` (written last, atomically:
   the run is complete) still marked, and ``rerun-incomplete`` would delete it and run the rule
   again: a new job, a second evaluation. This command hands every marked ``metrics.json`` to
   ``snakemake --cleanup-metadata`` first (also those of runs still in flight, which may finish
   while Snakemake starts), so they count as done.

A run that finishes after Snakemake has decided to run its rule still has its metrics.json
deleted by Snakemake before the rule starts; ``hcformer run`` then puts the same file back from
its second name (``.metrics.json.keep``, a hard link) instead of submitting a job.

Everything else is the run folders' job: each rerun ``hcformer run`` re-attaches to the job its
``job.json`` records (see ``hcformer.launch.run``). Only the standard library.
"""

from __future__ import annotations

import base64
import binascii
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hcformer.errors import HCFormerError
from hcformer.runfolder import METRICS, pid_alive, read_json, write_json_atomic

RECORD = "hcformer-campaign.json"


def _workdir(argv: list[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg in ("-d", "--directory") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--directory="):
            return Path(arg.split("=", 1)[1])
    return Path.cwd()


def _snakemake(argv: list[str], workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe) if exe.exists() else "snakemake", *argv, *extra]
    return subprocess.run(cmd, cwd=Path.cwd(), capture_output=True, text=True, check=False)


def _local_snakemakes(workdir: Path) -> list[int]:
    """Pids of Snakemake processes of this host working in ``workdir``."""
    found = []
    here = workdir.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if not any(b"snakemake" in part for part in cmdline[:3]):
                continue
            if Path(os.readlink(proc / "cwd")).resolve() == here and int(proc.name) != os.getpid():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def unlock_if_dead(argv: list[str], workdir: Path) -> str | None:
    """Remove Snakemake's lock of ``workdir`` when the campaign that held it is gone; returns
    what was done (None: there was no lock). Raises HCFormerError when it is not safe."""
    meta = workdir / ".snakemake"
    if not any((meta / "locks").glob("*.lock")):
        return None
    held = read_json(meta / RECORD)
    if held is None:
        live = _local_snakemakes(workdir)
        who = f"Snakemake pid {live[0]} on this host" if live else "no hcformer campaign"
        raise HCFormerError(
            f"{meta / 'locks'}: Snakemake's lock is held ({who}); if no snakemake runs in "
            f"{workdir} on any host, remove it with `snakemake --unlock` (same arguments) and "
            "run this command again"
        )
    pid, host = int(held.get("pid", -1)), held.get("host")
    if host != socket.gethostname():
        raise HCFormerError(
            f"{meta / 'locks'}: the campaign started on host {host} (pid {pid}) holds "
            f"Snakemake's lock; if that host is down, `snakemake --unlock` (same arguments) "
            "and run this command again"
        )
    if pid_alive(pid) or _local_snakemakes(workdir):
        raise HCFormerError(
            f"{workdir}: a campaign is running here (pid {pid} on {host}, since "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(held.get('since', 0)))}); "
            "wait for it or stop it first"
        )
    out = _snakemake(argv, workdir, "--unlock")
    if out.returncode != 0:
        raise HCFormerError(f"snakemake --unlock failed: {_last_line(out)}")
    return f"removed Snakemake's lock left by the campaign of pid {pid} (gone)"


def _decode_marker(path: Path, root: Path) -> str | None:
    """The output path a Snakemake incomplete marker stands for (its name is the path in URL-safe
    base64, cut into pieces of at most 254 characters, all but the last prefixed with ``@``)."""
    parts = path.relative_to(root).parts
    text = "".join(p.removeprefix("@") for p in parts)
    try:
        return base64.urlsafe_b64decode(text.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def marked_runs(workdir: Path) -> list[str]:
    """Run outputs (``metrics.json``) that Snakemake marks incomplete. Each is written last and
    atomically by its run's job: one that exists is complete; one that does not is simply
    missing (its rule runs and re-attaches to the job), and may appear complete at any moment,
    so its marker goes too."""
    root = workdir / ".snakemake" / "incomplete"
    found = []
    for marker in sorted(root.rglob("*")) if root.is_dir() else []:
        if not marker.is_file() or marker.name == "migration_underway":
            continue
        output = _decode_marker(marker, root)
        if output and Path(output).name == METRICS:
            found.append(output)
    return found


def _last_line(out: subprocess.CompletedProcess) -> str:
    lines = [x for x in (out.stderr + out.stdout).splitlines() if x.strip()]
    return lines[-1].strip() if lines else f"exit status {out.returncode}"


def repair(argv: list[str], say: Callable[[str], None]) -> None:
    """The two repairs of a dead campaign (the module docstring) for ``snakemake`` with
    ``argv``: Snakemake's lock removed when its campaign is gone, the marked ``metrics.json``
    handed to ``--cleanup-metadata``; ``say`` gets what was done, one line each."""
    workdir = _workdir(argv)
    done = unlock_if_dead(argv, workdir)
    if done:
        say(done)
    marked = marked_runs(workdir)
    if marked:
        # Snakemake reports files without a metadata record in its exit status after clearing
        # their markers: what counts is that none is still marked afterwards.
        out = _snakemake(argv, workdir, "--cleanup-metadata", *marked)
        left = set(marked_runs(workdir)) & set(marked)
        if left:
            raise HCFormerError(
                f"snakemake --cleanup-metadata left {len(left)} run outputs marked incomplete "
                f"(e.g. {sorted(left)[0]}): {_last_line(out)}"
            )
        finished = sum((workdir / m).is_file() for m in marked)
        say(
            f"{finished} finished runs kept (Snakemake, which died, still "
            f"marked their metrics.json incomplete); {len(marked) - finished} runs in flight"
        )


def run_snakemake(argv: list[str]) -> int:
    """Run ``snakemake`` with ``argv`` in this process's place (SIGINT, SIGTERM and SIGHUP
    passed on to it), recorded in ``.snakemake/hcformer-campaign.json`` while it runs; returns
    its exit status."""
    meta = _workdir(argv) / ".snakemake"
    write_json_atomic(
        meta / RECORD,
        {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "argv": argv},
    )
    exe = Path(sys.executable).with_name("snakemake")
    child = subprocess.Popen([str(exe) if exe.exists() else "snakemake", *argv])
    forward = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in
               (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}  # fmt: skip
    try:
        return child.wait()
    finally:
        for sig, old in forward.items():
            signal.signal(sig, old)
        if (read_json(meta / RECORD) or {}).get("pid") == os.getpid():
            (meta / RECORD).unlink(missing_ok=True)
