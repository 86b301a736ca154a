"""Training one run folder (App. D): :func:`train` ``(run_dir)``.

The run folder holds the resolved config and who the run is (``config.yaml``, ``run.json``:
written when the run is created, :func:`hcformer.launch.create.create_run`); training reads
them and nothing else (docs/interfaces.md, "The run folder").

The loop, in the paper's (Mask2Former's) way: AdamW with the backbone at 0.1x and no weight decay
on norms and embeddings (:mod:`hcformer.engine.optim`), poly or multi-step decay with linear
warm-up, full-model gradient-norm clipping, AMP on CUDA only, DDP across processes and nodes
(:mod:`hcformer.engine.distributed`), and gradient accumulation: ``solver.batch_size`` is the
global batch whatever the number of processes; each process takes ``batch_size / world_size``
images in passes of ``solver.micro_batch``.

Randomness is keyed by (seed, iteration, global sample index) (:mod:`hcformer.engine.randomness`)
and the loss is normalised over the global batch (:class:`hcformer.losses.LossNorm`), so N
processes compute what one process would with the same global batch, and a resumed run replays
the interrupted one: ``checkpoints/last.pt`` every ``solver.checkpoint_every`` iterations and on
SIGTERM / SIGINT / SIGUSR1 or :func:`hcformer.engine.signals.request_stop` (saved at the next
iteration boundary; then exit status 128 + signal, or 3); training the folder again resumes from
it. A finished run writes ``model_final.pt``; rerunning it does nothing.

Visibility of a long run: every ``solver.log_every`` iterations a line of ``train_log.jsonl``
(the losses of that iteration, learning rate, training seconds, wall-clock ``timestamp``;
between these lines a step reads nothing from the device but its matching costs, and a NaN/inf
loss is caught at the next read, before anything is logged, validated or saved) and a progress
line on stderr (what a SLURM job's log shows): iteration/total, loss, learning rate, seconds per
iteration, images per second, ETA, peak memory (CUDA allocator, or the process's peak RSS on the
CPU).
Every ``solver.eval_every`` iterations (the authors' ``TEST.EVAL_PERIOD``; 0: never; never at
the last iteration, which ``hcformer evaluate`` scores) the current weights are scored on the
validation split (:meth:`hcformer.engine.evaluate.Evaluator.run` into a temporary folder; the
run's ``predictions/`` and ``metrics.json`` are untouched) by the main process while the others
wait; the scores go to ``train_log.jsonl`` (a line with ``"split": "val"``) and MLflow at that
iteration. Validation comes before the iteration's checkpoint, and the checkpoint records the
last validated iteration: a run stopped during a validation (which a stop request cuts short)
validates that iteration again on resume, one killed after it keeps its line, and the log's
replay drops lines past the checkpoint, so no validation is lost or logged twice.

:func:`train` returns a :class:`TrainResult`; ``hcformer train`` (:mod:`hcformer.commands.train`)
and the launchers' jobs (:mod:`hcformer.launch.job`) call it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hcformer.config import Config, to_dict
from hcformer.data import build_dataset
from hcformer.engine import distributed, signals
from hcformer.engine.batches import Pass, TrainBatches, iterate, to_device
from hcformer.engine.checkpoint import (
    atomic_torch_save,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from hcformer.engine.distributed import all_reduce_sum
from hcformer.engine.evaluate import Evaluator
from hcformer.engine.optim import build_optimizer, build_scheduler
from hcformer.engine.randomness import point_generator, seed_dropout, seed_init
from hcformer.engine.runinfo import check_num_classes, read_run
from hcformer.errors import ConfigError, HCFormerError
from hcformer.losses import LossNorm, build_criterion, summary_values
from hcformer.models import build_model
from hcformer.runfolder import (
    CHECKPOINTS,
    FINAL_WEIGHTS,
    PREV_CHECKPOINT,
    RUN_INFO,
    TRAIN_LOG,
    write_json_atomic,
    write_text_atomic,
)
from hcformer.tracking import check_live, open_tracker

VALIDATION_WAIT_H = 6  # how long the other processes wait for the main one's validation


@dataclass
class TrainResult:
    """How a call of :func:`train` ended.

    Attributes:
      iteration: iterations completed (and saved).
      finished: all ``solver.iterations`` are done and ``model_final.pt`` exists.
      stopped: stopped early by a signal or :func:`~hcformer.engine.signals.request_stop`.
      exit_code: 0 when finished, else 128 + signal number (or 3): what ``hcformer train`` exits with.
    """

    iteration: int
    finished: bool
    stopped: bool
    exit_code: int


# --------------------------------------------------------------------------------------
# The loop.


class Trainer:
    """State and steps of one training run in one process (see the module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path, *, seed: int, info: dict[str, Any]) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.info = info
        self.dist = distributed.init_distributed()
        solver = cfg.solver
        world = self.dist.world_size
        if solver.batch_size % world:
            raise ConfigError(
                f"solver.batch_size: {solver.batch_size} is not divisible by the {world} processes"
            )
        self.per_rank = solver.batch_size // world
        self.micro = solver.micro_batch or self.per_rank
        if self.per_rank % self.micro:
            raise ConfigError(
                f"solver.micro_batch: {self.micro} does not divide the {self.per_rank} images "
                "of each process"
            )
        if cfg.data.num_workers < 0:
            raise ConfigError(
                f"data.num_workers: {cfg.data.num_workers}, expected 0 (load in the training "
                "process) or more worker processes"
            )
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.amp = solver.amp and self.device.type == "cuda"
        if solver.eval_every < 0:
            raise ConfigError(
                f"solver.eval_every: {solver.eval_every}, expected 0 (validate only at the end) "
                "or a number of iterations"
            )
        self.iteration = 0
        self.validated = 0  # the last iteration scored on the validation split
        self.elapsed = 0.0  # training seconds over all attempts
        self._wait_group = None  # gloo group the other processes wait in during a validation
        self._update_lock = threading.Lock()
        # (iteration, names, device values) of the steps not yet read (read_stats).
        self._pending: list[tuple[int, list[str], Any]] = []

    # -- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        self.dataset = build_dataset(self.cfg.data, "train")
        if len(self.dataset) == 0:
            raise HCFormerError(f"data.root {self.cfg.data.root}: the training split has no images")
        check_num_classes(self.cfg, self.dataset)
        self.batches = TrainBatches(
            self.dataset, self.cfg, seed=self.seed, passes=self.micro_batches()
        )
        seed_init(self.seed)
        self.model = build_model(self.cfg.model).to(self.device)
        self.model.train()
        self.criterion = build_criterion(self.cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, self.cfg.solver)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.solver)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.resume()
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.cfg.solver.find_unused_parameters,
            )

    def state(self) -> dict[str, Any]:
        state = {
            "format": 1,
            "iteration": self.iteration,
            "seed": self.seed,
            "elapsed": self.elapsed,
            "validated": self.validated,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def resume(self) -> None:
        path = latest_checkpoint(self.run_dir / CHECKPOINTS)
        if path is None:
            return
        try:
            state = load_checkpoint(path)
        except HCFormerError:
            prev = path.with_name(PREV_CHECKPOINT)
            if path.name == PREV_CHECKPOINT or not prev.is_file():
                raise
            state = load_checkpoint(prev)
            if self.dist.is_main:
                # Out of the rotation (the next save would make it prev.pt), kept to look at.
                aside = path.with_name(f"{path.name}.corrupt")
                os.replace(path, aside)
                print(
                    f"hcformer train: {path} unreadable (kept as {aside.name}); resuming from "
                    f"{prev}",
                    file=sys.stderr,
                )
            path = prev
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.validated = int(state.get("validated", self.iteration))
        self.elapsed = float(state.get("elapsed", 0.0))
        if self.dist.is_main:
            print(
                f"hcformer train: resumed from {path} at iteration {self.iteration}",
                file=sys.stderr,
            )

    def save(self) -> Path | None:
        """Write ``last.pt`` of the last completed iteration (main process only)."""
        if not self.dist.is_main:
            return None
        # Blocked signals: a handler calling save_now() never re-enters a save in progress.
        with signals.signals_blocked(), self._update_lock:
            if not self._pending_finite():  # weights past a non-finite loss: never saved
                print(
                    f"hcformer train: a loss since the last read is not finite; "
                    f"iteration {self.iteration} not saved",
                    file=sys.stderr,
                )
                return None
            return save_checkpoint(self.state(), self.run_dir / CHECKPOINTS)

    # -- data ---------------------------------------------------------------------------------
    def micro_batches(self) -> list[list[int]]:
        """The global sample indices of this process (the same every iteration), split into
        passes."""
        first = self.dist.rank * self.per_rank
        indices = list(range(first, first + self.per_rank))
        return [indices[i : i + self.micro] for i in range(0, len(indices), self.micro)]

    # -- one iteration ----------------------------------------------------------------------
    def step(self, prefetched: list[Pass] | None = None) -> tuple[list[str], Any]:
        """One iteration over the global batch; returns the names and a float64 device tensor
        of this process's loss shares (and ``grad_norm``), also kept for the next
        :meth:`read_stats`. ``prefetched``: this iteration's passes from
        :func:`hcformer.engine.batches.iterate` (made here when absent).

        Nothing here waits for the device but the matching (one copy of every cost matrix to
        the host per pass, :func:`hcformer.losses.matcher.costs_to_host`): the logged values
        and the non-finite check are read every ``solver.log_every`` iterations
        (:meth:`read_stats`)."""
        it = self.iteration
        if prefetched is None:
            prefetched = self.batches[it]
        # The normalisers from the host's targets, before they move (no wait for the device).
        norms = [
            self.criterion.norm_for(targets, self.cfg.model.head.queries)
            for _, targets, _ in prefetched
        ]
        if self.dist.enabled:  # summed over processes: a wait, in DDP only
            local = sum((n.as_tensor() for n in norms), torch.zeros(4, dtype=torch.float64))
            norm = LossNorm.from_tensor(all_reduce_sum(local.to(self.device)).cpu())
        else:
            norm = LossNorm.total(norms)
        passes = [
            (*to_device(images, targets, self.device), idx) for images, targets, idx in prefetched
        ]
        keys: list[str] = []
        totals = None
        for n, (images, targets, indices) in enumerate(passes):
            seed_dropout(self.seed, it, indices[0])
            sync = n == len(passes) - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                    outputs = self.ddp_model(images)
                generators = [point_generator(self.seed, it, j, self.device) for j in indices]
                losses = self.criterion(outputs, targets, generators=generators, norm=norm)
                # Shares of the global loss; DDP averages gradients over processes, so scale back.
                loss = sum(losses.values()) * self.dist.world_size
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            keys, values = summary_values(losses)
            totals = values if totals is None else totals + values
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.solver.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.cfg.solver.clip_grad
            )
            share = grad_norm.detach().double().reshape(1) / max(self.dist.world_size, 1)
            keys, totals = [*keys, "grad_norm"], torch.cat([totals, share])
        with signals.signals_blocked(), self._update_lock:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.iteration = it + 1
            self._pending.append((it + 1, keys, totals))
        return keys, totals

    def read_stats(self) -> list[tuple[int, dict[str, float]]]:
        """The logged values of every iteration since the last read, summed over processes,
        read from the device in one copy (a wait); raises :class:`HCFormerError` at the first
        iteration whose loss is not finite (:meth:`check_finite`)."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        stacked = torch.stack([values for _, _, values in pending])
        rows = all_reduce_sum(stacked).cpu().tolist()
        out = [(it, dict(zip(keys, row, strict=True))) for (it, keys, _), row in zip(pending, rows)]
        for it, totals in out:
            self.check_finite(it, totals)
        return out

    def check_finite(self, iteration: int, totals: dict[str, float]) -> None:
        """Stop at a NaN/inf loss (as detectron2's trainer, which the authors' code runs on),
        read every ``solver.log_every`` iterations and before any checkpoint or validation:
        the weights since are never saved, ``last.pt`` stays the last good checkpoint.
        ``totals``: the iteration's values summed over processes (``grad_norm`` is not checked:
        AMP skips the steps whose gradients overflow)."""
        bad = {k: v for k, v in totals.items() if k != "grad_norm" and not math.isfinite(v)}
        if not bad:
            return
        terms = [k for k in sorted(bad) if k != "loss"] or sorted(bad)
        shown = ", ".join(f"{k} = {bad[k]}" for k in terms)
        kept = latest_checkpoint(self.run_dir / CHECKPOINTS)
        raise HCFormerError(
            f"iteration {iteration}: the loss is not finite ({shown}); stopped at iteration "
            f"{self.iteration} without saving the weights since; "
            f"{f'last good checkpoint {kept} kept' if kept else 'no checkpoint yet'}"
        )

    def _pending_finite(self) -> bool:
        """Whether every loss since the last :meth:`read_stats` is finite (this process's
        shares; a wait): what :meth:`save` checks before writing weights."""
        if not self._pending:
            return True
        losses = [v[: len(k) - (k[-1] == "grad_norm")] for _, k, v in self._pending]
        return bool(torch.isfinite(torch.cat(losses)).all())

    def stop_agreed(self) -> bool:
        """Whether a stop was requested (on any process: a wait for the all-reduce in DDP; the
        host's flag alone on one process)."""
        if not self.dist.enabled:
            return signals.stop_requested()
        flag = torch.tensor([1.0 if signals.stop_requested() else 0.0], device=self.device)
        return float(all_reduce_sum(flag)) > 0

    # -- the run ------------------------------------------------------------------------------
    def run(self, *, progress: bool = True) -> TrainResult:
        solver = self.cfg.solver
        total = solver.iterations
        main = self.dist.is_main
        tracker = self._open_tracker() if main else None
        log = TrainLog(self.run_dir, self.iteration) if main else None
        bar = Progress(
            total,
            self.iteration,
            enabled=main and progress,
            batch_size=solver.batch_size,
            device=self.device,
            eval_every=solver.eval_every,
        )
        if self.dist.enabled and solver.eval_every > 0 and self.iteration < total:
            # Validation runs on the main process only; the others wait in a gloo barrier,
            # whose timeout (unlike NCCL's 10 minutes) allows a long validation split.
            self._wait_group = torch.distributed.new_group(
                backend="gloo", timeout=timedelta(hours=VALIDATION_WAIT_H)
            )
        signals.register_saver(self.save)
        stopped = False
        batches = iterate(
            self.batches,
            self.iteration,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        try:
            if self.validation_due(self.iteration) and self.validated < self.iteration:
                # Stopped during this iteration's validation last time: score it now.
                self.validate(log, tracker, bar)
            while self.iteration < total:
                started = time.perf_counter()
                self.step(next(batches))
                it = self.iteration
                log_due = it % max(solver.log_every, 1) == 0 or it == total
                save_due = solver.checkpoint_every > 0 and it % solver.checkpoint_every == 0
                if log_due or save_due or self.validation_due(it):
                    # The one read of the logged values (and the non-finite check) since the
                    # last: nothing past a non-finite loss is logged, validated or saved. It
                    # waits for the device, so it counts as training time.
                    read = self.read_stats()
                self.elapsed += time.perf_counter() - started
                if log_due:
                    totals = read[-1][1]
                    entry = {"iteration": it, **{k: totals[k] for k in sorted(totals)}}
                    entry["lr"] = max(g["lr"] for g in self.optimizer.param_groups)
                    entry["time"] = round(self.elapsed, 3)
                    entry["timestamp"] = round(time.time(), 3)
                    if log is not None:
                        log.write(entry)
                    if tracker is not None:
                        tracker.log_metrics(
                            {k: v for k, v in entry.items() if k not in ("iteration", "timestamp")},
                            it,
                        )
                    bar.update(it, entry)
                if self.validation_due(it):
                    self.validate(log, tracker, bar)
                if self.stop_agreed():
                    stopped = it < total
                    if stopped:
                        self.read_stats()
                        self.save()
                        break
                if solver.checkpoint_every > 0 and it % solver.checkpoint_every == 0 and it < total:
                    self.save()
        except BaseException:
            if tracker is not None:
                tracker.end("FAILED")
            raise
        finally:
            batches.close()  # a DataLoader's workers end here
            signals.register_saver(None)
            bar.close()
        if stopped:
            if main:
                print(
                    f"hcformer train: stopped at iteration {self.iteration}; rerun to resume",
                    file=sys.stderr,
                )
            return TrainResult(self.iteration, False, True, signals.exit_code())
        self.save()
        if main:
            atomic_torch_save(self.model.state_dict(), self.run_dir / FINAL_WEIGHTS)
        return TrainResult(self.iteration, True, False, 0)

    def _open_tracker(self):
        if not self.cfg.tracking.enabled:
            return None
        return open_tracker(self.run_dir, to_dict(self.cfg), self.info)

    # -- periodic validation --------------------------------------------------------------------
    def validation_due(self, it: int) -> bool:
        """Whether iteration ``it`` is scored on the validation split (never the last one:
        ``hcformer evaluate`` scores the final weights)."""
        every = self.cfg.solver.eval_every
        return every > 0 and 0 < it < self.cfg.solver.iterations and it % every == 0

    def validate(self, log: TrainLog | None, tracker, bar: Progress) -> dict[str, float] | None:
        """Score the current weights on the validation split (main process; the others wait):
        the scores, also logged at this iteration, or None when a stop request cut it short
        (:attr:`validated` then stays behind, so a resumed run scores this iteration again)."""
        it = self.iteration
        scores = self._validate_main(it) if self.dist.is_main else None
        if self._wait_group is not None:
            torch.distributed.barrier(group=self._wait_group)
        if scores is None:
            return None
        self.validated = it
        entry = {"iteration": it, "split": "val", **scores, "timestamp": round(time.time(), 3)}
        if log is not None:
            log.write(entry)
        if tracker is not None:
            tracker.log_metrics(scores, it)
        bar.validation(it, scores)
        return scores

    def _validate_main(self, it: int) -> dict[str, float] | None:
        evaluator = Evaluator(self.run_dir, device=str(self.device))
        evaluator.iterations = it
        self.model.eval()
        try:
            with tempfile.TemporaryDirectory(prefix=".validation-", dir=self.run_dir) as tmp:
                metrics = evaluator.run(self.model, out_dir=Path(tmp), stop=signals.stop_requested)
        finally:
            self.model.train()
        if metrics is None:
            print(
                f"hcformer train: validation at iteration {it} stopped; it runs again on resume",
                file=sys.stderr,
                flush=True,
            )
            return None
        return {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k not in ("iterations", "images")
        }


class TrainLog:
    """``train_log.jsonl``: one JSON line per logged iteration; on resume, lines past the
    resumed iteration (written after the last checkpoint) are dropped so the log replays too."""

    def __init__(self, run_dir: Path, resumed_at: int) -> None:
        self.path = Path(run_dir) / TRAIN_LOG
        if self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, AttributeError):
                    if int(json.loads(line).get("iteration", 0)) <= resumed_at:
                        kept.append(line)
            write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def peak_memory(device) -> tuple[float, str]:
    """The process's peak memory in GiB and what it measures: the CUDA allocator's peak on a
    GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"  # KiB on Linux


def duration(seconds: float) -> str:
    """``1d02h03m``, ``2h03m``, ``3m04s`` or ``5s``."""
    s = max(int(round(seconds)), 0)
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """A tqdm bar on a terminal, else one line per logged iteration on stderr (a SLURM job's
    log): iteration/total, loss, learning rate, seconds per iteration and images per second over
    the iterations since the last line, ETA (those seconds per iteration over the iterations
    left, plus the validations left at the last one's duration), peak memory."""

    def __init__(
        self,
        total: int,
        start: int,
        *,
        enabled: bool,
        batch_size: int = 1,
        device=None,
        eval_every: int = 0,
    ) -> None:
        self.enabled = enabled
        self.total = total
        self.batch_size = batch_size
        self.device = device
        self.eval_every = eval_every
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)
        self.last = start
        self.last_time: float | None = None  # training seconds at the last line
        self.eval_seconds = 0.0  # the last validation's duration

    def line(self, it: int, entry: dict[str, Any]) -> str:
        """The progress line of iteration ``it`` (``entry``: its training-log line)."""
        parts = [
            f"it {it}/{self.total} ({100 * it / max(self.total, 1):.1f}%)",
            f"loss {entry.get('loss', 0):.4f}",
            f"lr {entry['lr']:.3g}",
        ]
        done = it - self.last
        if self.last_time is not None and done > 0:
            per_it = (entry["time"] - self.last_time) / done
            left = self.total - it
            validations = 0
            if self.eval_every > 0:  # those still to come (none at the last iteration)
                validations = (self.total - 1) // self.eval_every - it // self.eval_every
            eta = left * per_it + validations * self.eval_seconds
            speed = self.batch_size / per_it if per_it > 0 else float("inf")
            parts += [f"{per_it:.3f} s/it", f"{speed:.1f} img/s", f"ETA {duration(eta)}"]
        if self.device is not None:
            gib, what = peak_memory(self.device)
            parts.append(f"peak {what} {gib:.2f} GiB")
        return "hcformer train: " + " | ".join(parts)

    def update(self, it: int, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(it - self.last)
            postfix = {"loss": f"{entry.get('loss', 0):.3f}", "lr": f"{entry['lr']:.2e}"}
            if self.device is not None:
                gib, what = peak_memory(self.device)
                postfix[what] = f"{gib:.1f}G"
            self.bar.set_postfix(postfix)
        else:
            print(self.line(it, entry), file=sys.stderr, flush=True)
        self.last = it
        self.last_time = entry["time"]

    def validation(self, it: int, scores: dict[str, float]) -> None:
        self.eval_seconds = float(scores.get("eval_seconds", 0.0))
        if not self.enabled:
            return
        shown = " ".join(
            f"{k} {v:.2f}" for k, v in scores.items() if k != "eval_seconds" and "_level" not in k
        )
        text = f"hcformer train: validation at it {it}: {shown} ({self.eval_seconds:.0f} s)"
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return ""


def train(run_dir: str | Path, *, progress: bool = True) -> TrainResult:
    """Train (or resume) the run folder ``run_dir`` (created by
    :func:`hcformer.launch.create.create_run`); see the module docstring. ``progress``: the
    progress lines on stderr."""
    run_dir = Path(run_dir)
    cfg, info = read_run(run_dir)
    if cfg.tracking.enabled:  # before anything is written or loaded: refused in a second
        check_live(run_dir, to_dict(cfg), info)
    if "seed" not in info:
        raise HCFormerError(
            f"{run_dir / RUN_INFO}: no seed; create the run with hcformer run or hcformer train"
        )
    trainer = Trainer(cfg, run_dir, seed=int(info["seed"]), info=info)
    if trainer.dist.is_main and "started_at" not in info:
        # Who and when, for MLflow (the first start stays).
        trainer.info = {"started_at": round(time.time(), 3), "user": _user(), **info}
        write_json_atomic(run_dir / RUN_INFO, trainer.info)
    if (run_dir / FINAL_WEIGHTS).is_file():
        if trainer.dist.is_main:
            print(
                f"hcformer train: {run_dir / FINAL_WEIGHTS} exists; nothing to do", file=sys.stderr
            )
        return TrainResult(cfg.solver.iterations, True, False, 0)
    signals.reset()
    with signals.handle_signals():
        trainer.setup()
        return trainer.run(progress=progress)
