"""Randomness keyed by (seed, iteration, global sample index), never by process.

Every draw is a pure function of the run's seed and of where it happens, so that DDP with N
processes gives the same samples, the same point samples and the same data order as one process
with the same global batch, and a resumed run replays exactly. ``global_index`` is the position of a sample in the global batch (0..B-1).

- data order: one permutation of the training set per epoch, keyed by (seed, epoch);
- augmentation: ``numpy.random.default_rng([seed, iteration, global_index])``;
- point sampling of the loss: a ``torch.Generator`` per sample keyed like the augmentation;
- dropout / drop path: the global torch generator is re-seeded per micro-batch from
  (seed, iteration, first global index), so they replay on resume (they do depend on how the
  batch is split over processes);
- model initialisation: keyed by the seed.
"""

from __future__ import annotations

import numpy as np
import torch

# Distinct streams so that, e.g., point sampling never reuses the augmentation's numbers.
_POINTS, _DROPOUT, _INIT, _ORDER = 1, 2, 3, 4


def key(*parts: int) -> int:
    """A 63-bit integer derived from ``parts`` (for ``torch`` seeds)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def dataset_index(seed: int, position: int, size: int) -> int:
    """The dataset index of the ``position``-th sample drawn in the run (epoch-wise shuffling)."""
    epoch, offset = divmod(position, size)
    return int(epoch_permutation(seed, epoch, size)[offset])


_perm_cache: dict[tuple[int, int, int], np.ndarray] = {}


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    cache_key = (seed, epoch, size)
    if cache_key not in _perm_cache:
        if len(_perm_cache) > 4:
            _perm_cache.clear()
        rng = np.random.default_rng([seed, epoch, _ORDER])
        _perm_cache[cache_key] = rng.permutation(size)
    return _perm_cache[cache_key]


def augmentation_rng(seed: int, iteration: int, global_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, iteration, global_index])


def point_generator(
    seed: int, iteration: int, global_index: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(key(seed, iteration, global_index, _POINTS))
    return generator


def seed_dropout(seed: int, iteration: int, first_index: int) -> None:
    torch.manual_seed(key(seed, iteration, first_index, _DROPOUT))


def seed_init(seed: int) -> None:
    """Seed the global generators before the model is built (model initialisation)."""
    torch.manual_seed(key(seed, _INIT))
