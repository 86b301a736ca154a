"""``hcformer status``: where a campaign stands, per paper table (docs/campaign.md).

    hcformer status [--results results] [--scale smoke] [--table ID] [--seeds 0 1 2] [--json]

For every paper table it counts the runs the table needs (experiment x seed) that are done,
running, failed or not started, as :mod:`hcformer.runfolder.state` decides from the run folders
(one ``squeue`` for all recorded SLURM jobs). For each failed run it prints the last line of its
log and the log's path (submitit's ``jobs/<id>_0_log.err``, else the Snakemake rule's log, else
``error.txt``).

It reads files only and imports no torch (nor mlflow, pandas): it answers in well under 2 s on a
whole smoke tree. The table -> experiment mapping comes from :mod:`hcformer.experiments`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hcformer.experiments import load_table, load_tables
from hcformer.runfolder import (
    RunState,
    RunStatus,
    pending_slurm_jobs,
    run_state,
    slurm_states,
)

STATES = tuple(state.value for state in RunState)


@dataclass
class TableStatus:
    id: str
    title: str
    counts: dict[str, int] = field(default_factory=dict)
    runs: list[RunStatus] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.runs)

    @property
    def complete(self) -> bool:
        return all(r.state == RunState.DONE for r in self.runs)


# --------------------------------------------------------------------------------------
# Per table.


def campaign_status(
    results: Path, scale: str, seeds: list[int], table_id: str | None = None
) -> list[TableStatus]:
    """The status of every paper table (or one), from the run folders under ``results``."""
    tables = [load_table(table_id)] if table_id else load_tables()
    needed = {t.id: t.experiment_ids for t in tables}
    experiments = sorted({e for ids in needed.values() for e in ids})
    slurm, asked = slurm_states(pending_slurm_jobs(results, experiments, seeds))
    now = time.time()
    runs = {
        (exp, seed): run_state(results, exp, seed, slurm, asked, now)
        for exp in experiments
        for seed in seeds
    }
    out = []
    for table in tables:
        status = TableStatus(table.id, table.title)
        status.runs = [runs[(exp, seed)] for exp in needed[table.id] for seed in seeds]
        status.counts = {s: sum(r.state == s for r in status.runs) for s in STATES}
        out.append(status)
    return out


def to_json(tables: list[TableStatus], results: Path, scale: str, seeds: list[int]) -> dict:
    unique = {(r.experiment, r.seed): r for t in tables for r in t.runs}
    return {
        "results": str(results),
        "scale": scale,
        "seeds": seeds,
        "tables": [
            {
                "id": t.id,
                "title": t.title,
                **t.counts,
                "total": t.total,
                "complete": t.complete,
                "runs": [asdict(r) for r in t.runs],
            }
            for t in tables
        ],
        "totals": {
            **{s: sum(r.state == s for r in unique.values()) for s in STATES},
            "total": len(unique),
        },
        "failed": [asdict(r) for r in unique.values() if r.state == "failed"],
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"hcformer status: {report['results']} (scale {report['scale']}, seeds "
             f"{' '.join(map(str, report['seeds']))})", ""]  # fmt: skip
    width = max([len(t["id"]) for t in report["tables"]] + [5])
    head = f"{'table':<{width}}  {'done':>5}  {'running':>7}  {'failed':>6}  {'not started':>11}"
    lines.append(f"{head}  {'total':>5}")
    for t in report["tables"]:
        mark = "  complete" if t["complete"] else ""
        lines.append(
            f"{t['id']:<{width}}  {t['done']:>5}  {t['running']:>7}  {t['failed']:>6}  "
            f"{t['not_started']:>11}  {t['total']:>5}{mark}"
        )
    tot = report["totals"]
    lines.append(
        f"{'runs':<{width}}  {tot['done']:>5}  {tot['running']:>7}  {tot['failed']:>6}  "
        f"{tot['not_started']:>11}  {tot['total']:>5}  (unique experiment x seed)"
    )
    running = [r for t in report["tables"] for r in t["runs"] if r["state"] == "running"]
    if running:
        seen = set()
        lines += ["", "running:"]
        for r in running:
            if r["run_dir"] not in seen:
                seen.add(r["run_dir"])
                lines.append(f"  {r['experiment']}/seed{r['seed']}: {r['reason']}")
    if report["failed"]:
        lines += ["", "failed (rerun the same command to resume from last.pt):"]
        for r in report["failed"]:
            lines.append(f"  {r['experiment']}/seed{r['seed']}: {r['reason']}")
            lines.append(f"    log: {r['log'] or '(no log found)'}")
            if r["last_line"]:
                lines.append(f"    last line: {r['last_line']}")
    return "\n".join(lines)
