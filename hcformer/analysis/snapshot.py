"""A snapshot of a campaign in progress: every table, figure and the README from the runs that
have finished so far (``hcformer aggregate --snapshot``; the Snakemake target ``snapshot``).

The DAG builds a table once every run it needs has finished (the paper's median of three
seeds). A snapshot waits for nothing and submits nothing: it reads the run folders as they are
(done, running, failed or missing, as ``hcformer status`` decides, asking the scheduler once),
takes the median of the seeds that finished (the provenance says how many of how many, and
which run failed, why and where its log is), marks a cell with no finished seed *running*,
*failed* or *missing*, and writes what the DAG writes, under ``<results>/snapshot/``:
``aggregate/``, ``tables/``, ``provenance/``, ``macros.tex``, ``tables.pdf`` (when pdflatex is
installed), ``figures/`` (the ablations), ``runs.csv``, ``summary.csv`` and ``README.md``. The
DAG's own outputs are never touched. A table that cannot be drawn or compiled blocks no other:
the rest is written, then its error is reported.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hcformer.analysis.aggregate import (
    collect_runs,
    load_profile,
    mlflow_run_ids,
    table_cells,
    write_cells,
    write_runs,
)
from hcformer.experiments import all_experiments, load_tables
from hcformer.runfolder import RunState

RUN_STATES = tuple(state.table_word for state in RunState)  # done, running, failed, missing


@dataclass
class Snapshot:
    """What a snapshot wrote: its folder, the runs by state, and what could not be written."""

    results: Path
    out: Path
    taken: str
    runs: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = sum(self.runs.values())
        states = ", ".join(f"{self.runs[s]} {s}" for s in RUN_STATES[1:])
        return (
            f"hcformer aggregate: snapshot of {self.results}: {self.runs['done']} of {total} "
            f"runs done ({states}) -> {self.out / 'README.md'}"
        )

    def note(self, scale: str) -> str:
        total = sum(self.runs.values())
        return (
            f"**A snapshot of the campaign, taken {self.taken}**, from the runs finished by then "
            f"({self.runs['done']} of {total} runs done, {self.runs['running']} running, "
            f"{self.runs['failed']} failed, {self.runs['missing']} not started; "
            f"`hcformer status --scale {scale}` names the failed runs' logs). A cell is the "
            "median of the seeds that finished (†: fewer than expected, ‡: and a seed failed; "
            "`provenance/` lists each seed's state); a cell no seed has finished yet says "
            "*running*, *failed* or *missing*. The final tables are `../tables/`, built once "
            "every run of a table has finished; the run folders and profiles are in `../runs/` "
            "and `../profile/`. A new snapshot: `hcformer aggregate --results "
            f"{self.results} --scale {scale} --snapshot` (or the Snakemake target `snapshot`); "
            "it waits for and submits nothing."
        )


def table_runs(cells: list[dict]) -> dict[tuple[str, int], str]:
    """``(experiment, seed) -> state`` of every run a table's cells list."""
    return {
        (run["experiment"], run["seed"]): run["status"]
        for cell in cells
        for run in cell["runs"]
        if "seed" in run
    }


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def build(
    results: Path,
    scale: str,
    seeds: list[int],
    out: Path | None = None,
    skip_requires: list[str] | tuple[str, ...] = (),
    mlflow_uri: str = "",
) -> Snapshot:
    """Write the snapshot of ``results`` (a scale's root, e.g. ``results/paper``) to ``out``
    (default ``<results>/snapshot``)."""
    # Here: figures loads seaborn and matplotlib (1.3 s), which only a snapshot needs.
    from hcformer.analysis import figures, report, tables

    results = Path(results)
    out = Path(out) if out is not None else results / "snapshot"
    snap = Snapshot(results, out, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    experiments = all_experiments(scale)
    skipped = {e.id for e in experiments.values() if e.requires and e.requires in skip_requires}
    paper_tables = load_tables()
    needed = [i for t in paper_tables for i in t.experiment_ids]
    ids = mlflow_run_ids(mlflow_uri, scale, {e.dataset for e in experiments.values()})
    runs = collect_runs(results, sorted(set(experiments) | set(needed)), seeds, ids)
    snap.runs = Counter(
        r.status
        for r in runs.values()
        if r.experiment in experiments and r.experiment not in skipped
    )
    write_runs(
        {k: r for k, r in runs.items() if r.experiment in experiments},
        experiments,
        skipped,
        out / "runs.csv",
        out / "summary.csv",
    )

    def attempt(what: str, step) -> None:
        try:
            step()
        except Exception as exc:  # one table's failure must not cost the others theirs
            snap.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    all_cells, texs = [], []
    for table in paper_tables:

        def write_table(table=table) -> None:
            for stale in (  # a table that fails this time shows no older snapshot's numbers
                out / "aggregate" / f"{table.id}.csv",
                out / "tables" / f"{table.id}.tex",
                out / "provenance" / f"{table.id}.json",
                out / "figures" / f"{table.id}.pdf",
                out / "figures" / f"{table.id}.png",
            ):
                stale.unlink(missing_ok=True)
            profile = results / "profile" / f"{table.id}.json"
            source = str(profile) if profile.exists() else ""
            cells = table_cells(table, runs, seeds, load_profile(profile), skipped, source)
            write_cells(cells, out / "aggregate" / f"{table.id}.csv")
            all_cells.append(cells)
            tex = out / "tables" / f"{table.id}.tex"
            _write(tex, tables.render_table(table.id, table.title, cells, scale))
            texs.append(tex)
            prov = tables.provenance(table.id, table.title, cells, scale)
            prov["snapshot"] = {
                "taken": snap.taken,
                "runs": dict(Counter(table_runs(cells).values())),
                "note": "medians of the seeds finished by then; the final table is "
                f"{results / 'tables' / (table.id + '.tex')}",
            }
            _write(out / "provenance" / f"{table.id}.json", json.dumps(prov, indent=1) + "\n")
            if table.figure:
                attempt(
                    f"{table.id} figure",
                    lambda: figures.draw(cells, table.title, scale, out / "figures" / table.id),
                )

        attempt(table.id, write_table)
    attempt(
        "macros.tex", lambda: _write(out / "macros.tex", tables.render_macros(all_cells, scale))
    )
    if shutil.which("pdflatex") is not None and texs:
        title = f"HCFormer reproduction: a snapshot of every table, scale {scale}, {snap.taken}"
        attempt("tables.pdf", lambda: tables.compile_pdf(texs, out / "tables.pdf", title))
    attempt(
        "README.md",
        lambda: _write(out / "README.md", report.render(out, scale, snap.note(scale))),
    )
    return snap
