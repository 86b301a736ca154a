"""The training batches of each iteration, made ahead by ``data.num_workers`` worker processes.

A sample is keyed by (seed, iteration, global sample index) (:mod:`hcformer.engine.randomness`):
which image, and how it is augmented, never depends on who makes it or when. So the batches of
iteration ``i`` can be made by any process, in any order, ahead of time: :func:`iterate` hands
them out in order from ``start``, made in the caller's process (``num_workers`` 0) or by a
``torch.utils.data.DataLoader`` whose workers prefetch the next iterations while the current one
trains (at paper scale an iteration's share is several LSJ-augmented 1024 x 1024 images per
GPU). Both give the same tensors.

Workers ignore the stop signals: the training process alone decides when to stop and saves at
an iteration boundary (:mod:`hcformer.engine.signals`); its workers end with its loader.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hcformer.config import Config
from hcformer.data.transforms import collate, train_transform
from hcformer.engine.randomness import augmentation_rng, dataset_index
from hcformer.engine.signals import STOP_SIGNALS
from hcformer.models.hcformer import PIXEL_MEAN

# One pass of one iteration: images uint8 or float32 [B, 3, H, W] (0..255), per-image targets ({"labels",
# "masks"} and "sem_seg" where the dataset has it), and the global indices of its samples.
Pass = tuple[torch.Tensor, list[dict[str, torch.Tensor]], list[int]]


def train_pad_size(cfg: Config) -> tuple[int, int]:
    """The fixed padded size of training batches (so that padding never depends on how the
    global batch is split): the LSJ canvas or the crop, rounded up to a multiple of 32."""
    data = cfg.data
    h, w = (data.lsj_size, data.lsj_size) if data.augmentation == "lsj" else tuple(data.crop)
    return -(-h // 32) * 32, -(-w // 32) * 32


def train_pad_value(cfg: Config) -> float | tuple[float, ...]:
    """The image value of training padding (``data.train_image_pad``): 128, as the authors'
    ADE20K mapper and FixedSizeCrop pad crops before normalisation, or the model's pixel mean
    ("mean": 0 once normalised, as their model pads a batch whose mapper did not pad)."""
    if cfg.data.train_image_pad == "mean":
        return eval_pad_value()
    return float(cfg.data.train_image_pad)


def eval_pad_value() -> tuple[float, ...]:
    """The image value of test padding: the pixel mean the models subtract, so that the padding
    is exactly 0 after normalisation (the authors normalise, then pad the batch with 0)."""
    return PIXEL_MEAN


class TrainBatches(Dataset):
    """Item ``i``: the passes of iteration ``i`` of this process, on the CPU.

    Arguments:
      dataset: the training split (``hcformer.data.build_dataset(cfg.data, "train")``).
      cfg: the run's config (data transforms, batch size, iterations).
      seed: the run's seed.
      passes: the global sample indices of each pass of this process (the same every
        iteration: this rank's share of the global batch, split for gradient accumulation).
    """

    def __init__(self, dataset: Any, cfg: Config, *, seed: int, passes: list[list[int]]) -> None:
        self.dataset = dataset
        self.cfg = cfg
        self.seed = seed
        self.passes = passes

    def __len__(self) -> int:
        return self.cfg.solver.iterations

    def __getitem__(self, iteration: int) -> list[Pass]:
        return [(*self.load(iteration, indices), indices) for indices in self.passes]

    def sample(self, iteration: int, global_index: int) -> dict[str, Any]:
        """One augmented sample, keyed by (seed, iteration, global index)."""
        position = iteration * self.cfg.solver.batch_size + global_index
        record = self.dataset.load(dataset_index(self.seed, position, len(self.dataset)))
        return train_transform(
            record, self.cfg.data, augmentation_rng(self.seed, iteration, global_index)
        )

    def load(
        self, iteration: int, indices: list[int]
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The samples ``indices`` of ``iteration``, collated and padded to
        :func:`train_pad_size` (images with :func:`train_pad_value`, masks with zeros, semantic
        labels with 255)."""
        batch = collate(
            [self.sample(iteration, j) for j in indices],
            size_divisibility=32,
            pad_value=train_pad_value(self.cfg),
            min_size=train_pad_size(self.cfg),
        )
        targets = []
        for t in batch["targets"]:
            target = {"labels": t["instances"]["labels"], "masks": t["instances"]["masks"]}
            if "sem_seg" in t:
                target["sem_seg"] = t["sem_seg"]
            targets.append(target)
        return batch["images"], targets


def to_device(
    images: torch.Tensor, targets: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """A pass's tensors on ``device`` (asynchronous copies from pinned memory on CUDA); the
    images as float."""
    moved = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True).float(), moved


def iterate(
    batches: TrainBatches, start: int, *, num_workers: int, pin_memory: bool = False
) -> Iterator[list[Pass]]:
    """The passes of iterations ``start``, ``start + 1``, ... in order: made here, or by
    ``num_workers`` worker processes that keep two iterations each ready ahead."""
    if num_workers <= 0:
        for iteration in range(start, len(batches)):
            yield batches[iteration]
        return
    loader = DataLoader(
        batches,
        batch_size=None,  # an item is already an iteration's batch
        sampler=range(start, len(batches)),
        num_workers=num_workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_stop_signals,
        prefetch_factor=2,
    )
    yield from loader


def _as_is(item: list[Pass]) -> list[Pass]:
    return item


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker forked from the training process inherits its signal handlers (its own, or
    submitit's): the stop signals are the training process's alone."""
    for signum in (*STOP_SIGNALS, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
