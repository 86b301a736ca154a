"""The login node's share of a paper campaign: 204 waiting ``hcformer run`` processes.

Starts one ``hcformer run --launcher slurm --scale paper`` per (experiment, seed) of the paper's
68 experiments x 3 seeds against a fake SLURM (shell scripts ``sbatch``/``squeue``/``srun`` first
on PATH: ``sbatch`` numbers the jobs, ``squeue`` lists them all RUNNING and logs each call), waits
until every run has submitted and sits in its wait loop, then measures for ``--window`` seconds:

- the processes (count), their summed RSS and PSS (``/proc/<pid>/smaps_rollup``: PSS shares
  the pages common to all of them out fairly, RSS counts them once per process);
- the ``squeue`` calls in the window (the shared listing: at most one per ``--poll-s``).

Every process is then stopped. Writes JSON (``--out``) and prints one readable line.

    python benchmarks/login_waiters.py --out benchmarks/out/login_waiters.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SBATCH = r"""#!/bin/sh
exec 9>"$FAKE_SLURM/lock"; flock 9
id=$(( $(cat "$FAKE_SLURM/next_id" 2>/dev/null || echo 100) + 1 ))
echo $id > "$FAKE_SLURM/next_id"; echo $id >> "$FAKE_SLURM/jobs"
echo "Submitted batch job $id"
"""
SQUEUE = r"""#!/bin/sh
echo "$(date +%s.%N)" >> "$FAKE_SLURM/squeue.log"
sed 's/$/|RUNNING|hc/' "$FAKE_SLURM/jobs"
"""


def _kib(pid: int, key: str, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--poll-s", type=float, default=30.0)
    p.add_argument("--window", type=float, default=65.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    ids = [e["id"] for e in json.loads(subprocess.check_output(
        [sys.executable, "-m", "hcformer.cli", "experiments", "--json"], cwd=ROOT))]  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="login-waiters-"))
    fake, results = tmp / "slurm", tmp / "results"
    (fake / "bin").mkdir(parents=True)
    (fake / "jobs").write_text("")
    for name, text in (("sbatch", SBATCH), ("squeue", SQUEUE), ("srun", "#!/bin/sh\n")):
        (fake / "bin" / name).write_text(text)
        (fake / "bin" / name).chmod(0o755)
    env = {**os.environ, "FAKE_SLURM": str(fake), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{fake / 'bin'}{os.pathsep}{env['PATH']}"
    procs = []
    for exp in ids:
        for seed in (0, 1, 2):
            cmd = [sys.executable, "-m", "hcformer.cli", "run", "--experiment", exp, "--scale"]
            cmd += ["paper", "--seed", str(seed), "--results", str(results), "--launcher", "slurm"]
            cmd += ["--poll-s", str(args.poll_s)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL))
    start = time.time()
    while time.time() - start < 1800:
        locks = list(results.glob("runs/*/*/seed*/.lock"))
        noted = sum("job_id" in lock.read_text() for lock in locks)
        if noted == len(procs) or any(x.poll() is not None for x in procs):
            break
        time.sleep(2)
    settled = time.time() - start
    dead = [x.args for x in procs if x.poll() is not None]
    t0 = time.time()
    time.sleep(args.window)
    pids = [x.pid for x in procs if x.poll() is None]
    rss = sum(_kib(pid, "VmRSS:", "status") for pid in pids)
    pss = sum(_kib(pid, "Pss:", "smaps_rollup") for pid in pids)
    log = fake / "squeue.log"
    calls = [float(x) for x in log.read_text().split()] if log.exists() else []
    in_window = [c for c in calls if c >= t0]
    for x in procs:
        if x.poll() is None:
            x.send_signal(signal.SIGTERM)
    for x in procs:
        x.wait()
    out = {
        "runs": len(procs),
        "exited_early": len(dead),
        "processes": len(pids),
        "rss_mib_sum": round(rss / 1024, 1),
        "pss_mib_sum": round(pss / 1024, 1),
        "rss_mib_per_process": round(rss / 1024 / max(len(pids), 1), 1),
        "poll_s": args.poll_s,
        "window_s": args.window,
        "squeue_calls_in_window": len(in_window),
        "squeue_calls_per_minute": round(len(in_window) * 60 / args.window, 1),
        "seconds_to_submit_all": round(settled, 1),
        "host": platform.node(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"{out['processes']} waiting runs: RSS {out['rss_mib_sum']} MiB in all "
        f"({out['rss_mib_per_process']} MiB each), PSS {out['pss_mib_sum']} MiB; "
        f"{out['squeue_calls_in_window']} squeue calls in {args.window:.0f} s "
        f"(poll {args.poll_s:g} s); all submitted in {settled:.0f} s"
    )
    return 0 if not dead else 1


if __name__ == "__main__":
    sys.exit(main())
