"""``hcformer benchmark-train``: seconds per training iteration of an experiment on this device.

    hcformer benchmark-train --experiment ID [--scale paper] [--batch N] [--iterations 20]
                             [--warmup 5] [--out FILE.json] [--set key=value ...]

Times the real training step (forward with AMP on CUDA, the matching loss, backward, gradient
clipping, AdamW) on random images at the config's training crop with random targets (a few
rectangles per image), so no dataset is needed. The batch is ``--batch`` (default: the config's
global batch) and halves on CUDA out-of-memory until it fits. Writes JSON: device, amp, batch,
seconds per iteration (median and mean of the timed iterations), images per second, peak GPU
memory, and the split of a step (``phase_seconds``: data, forward, matching, loss, backward,
optimiser; CUDA events on a GPU, the wall clock on the CPU; the benchmark alone synchronises),
also printed as one readable line on stderr. Used for the GPU-hour budget of a campaign
(``hcformer budget``, docs/campaign.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hcformer.config import Config
from hcformer.engine.batches import to_device, train_pad_size
from hcformer.engine.optim import build_optimizer
from hcformer.engine.randomness import seed_init
from hcformer.errors import HCFormerError
from hcformer.losses import build_criterion
from hcformer.models import build_model


def random_targets(batch: int, height: int, width: int, num_classes: int, *, generator, device):
    """A few random rectangles per image, with labels and the matching semantic map."""
    targets = []
    for _ in range(batch):
        n = 4
        masks = torch.zeros(n, height, width, dtype=torch.bool)
        sem = torch.full((height, width), 255, dtype=torch.int64)
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        for k in range(n):
            y0, x0 = (
                int(v) for v in torch.randint(0, max(height // 2, 1), (2,), generator=generator)
            )
            masks[k, y0 : y0 + height // 3, x0 : x0 + width // 3] = True
            sem[masks[k]] = labels[k]
        targets.append(
            {"labels": labels.to(device), "masks": masks.to(device), "sem_seg": sem.to(device)}
        )
    return targets


PHASES = ("data", "forward", "matching", "loss", "backward", "optimiser")


class PhaseClock:
    """Marks the end of each phase of a step: CUDA events on a GPU (read, with one
    synchronisation, only by :meth:`split`), the wall clock on the CPU."""

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def split(self) -> dict[str, float]:
        """Seconds from each mark to the next, by the later mark's name (0 for a phase not
        marked: no matching in a per-pixel loss); clears the marks."""
        if self.cuda:
            torch.cuda.synchronize()
        out = dict.fromkeys(PHASES, 0.0)
        for (_, before), (name, after) in zip(self.marks, self.marks[1:]):
            seconds = before.elapsed_time(after) / 1000 if self.cuda else after - before
            out[name] = out.get(name, 0.0) + seconds
        self.marks = []
        return out


def time_training(
    cfg, *, batch: int, iterations: int, warmup: int, device, after_step=None
) -> dict[str, Any]:
    """Seconds per training step, and their split: ``data`` (the batch to the device, from
    pinned memory on CUDA, as the training loop gets it), ``forward``, ``matching`` (every
    set's costs, the host's assignment and the matches back), ``loss``, ``backward``,
    ``optimiser`` (unscale, clipping, AdamW): each the median over the timed steps.
    ``after_step()``, if given, is called after each step (e.g. a profiler's ``step``)."""
    seed_init(0)
    model = build_model(cfg.model).to(device).train()
    criterion = build_criterion(cfg).to(device)
    optimizer = build_optimizer(model, cfg.solver)
    amp = cfg.solver.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    height, width = train_pad_size(cfg)
    gen = torch.Generator().manual_seed(0)
    # uint8 images and host targets, as the data pipeline hands them over.
    images_host = torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)
    targets_host = random_targets(
        batch, height, width, cfg.model.num_classes, generator=gen, device="cpu"
    )
    if device.type == "cuda":
        images_host = images_host.pin_memory()
        targets_host = [{k: v.pin_memory() for k, v in t.items()} for t in targets_host]
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    clock = PhaseClock(device)
    criterion.phase_mark = clock.mark  # the criterion marks the end of its matching
    times, splits = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for it in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        clock.mark("start")
        images, targets = to_device(images_host, targets_host, device)
        clock.mark("data")
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            outputs = model(images)
        clock.mark("forward")
        loss = sum(criterion(outputs, targets, generators=generators).values())
        clock.mark("loss")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        clock.mark("backward")
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.solver.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark("optimiser")
        if after_step is not None:
            after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        split = clock.split()
        if it >= warmup:
            times.append(elapsed)
            splits.append(split)
    median = statistics.median(times)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": amp,
        "batch": batch,
        "input_size": [height, width],
        "iterations": iterations,
        "warmup": warmup,
        "seconds_per_iteration": median,
        "seconds_per_iteration_mean": statistics.fmean(times),
        "images_per_second": batch / median,
        "phase_seconds": {p: statistics.median(s[p] for s in splits) for p in PHASES},
        "phase_timer": "cuda events" if device.type == "cuda" else "wall clock",
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def benchmark(
    cfg: Config,
    exp_id: str,
    *,
    batch: int,
    iterations: int,
    warmup: int,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`time_training` on ``device`` (default: the GPU when there is one), the batch
    halved on CUDA out-of-memory until one fits (each halving said through ``log``)."""
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    while True:
        try:
            return time_training(
                cfg, batch=batch, iterations=iterations, warmup=warmup, device=where
            )
        except torch.OutOfMemoryError:
            if batch == 1:
                raise HCFormerError(f"{exp_id}: one image does not fit on {where}") from None
            batch //= 2
            torch.cuda.empty_cache()
            log(f"hcformer benchmark-train: out of memory; trying batch {batch}")


def readable(result: dict[str, Any]) -> str:
    """One line: seconds per step and the median of each phase."""
    phases = ", ".join(f"{p} {v:.4f}" for p, v in result["phase_seconds"].items())
    return (
        f"hcformer benchmark-train: {result['exp_id']} on {result['device']}, batch "
        f"{result['batch']}: {result['seconds_per_iteration']:.4f} s/it "
        f"({result['images_per_second']:.1f} img/s); phases in s ({result['phase_timer']}, "
        f"medians): {phases}"
    )
