"""``hcformer check-data``: every input the experiments of a scale need, before any is run.

For each dataset the experiments read (``data.dataset`` at ``data.root``, their train and val
splits): every file the readers open, checked by
:func:`hcformer.data.prepare.check_layout` (COCO panoptic also needs the instances JSON of the
same images, for ``ap_th_pan``); then each ``model.backbone.pretrained`` (the weights folder or
the hub cache, :mod:`hcformer.pretrained`). The first missing file is named with the exact
command that makes it: one line on stderr, exit 2. Synthetic datasets (tiny, smoke) are made
by the workflow and not checked. Compute nodes are often offline: this runs before anything is
submitted (the workflow's ``data`` rule at paper scale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hcformer.data.prepare import MissingInput, check_layout
from hcformer.experiments import all_experiments, pretrained_weights
from hcformer.pretrained import TIMM_PREFIX, weights_present


@dataclass(frozen=True)
class DataNeed:
    dataset: str
    root: Path
    splits: tuple[str, ...]
    instances: bool


def scale_needs(scale: str, dataset: str | None = None) -> tuple[list[DataNeed], dict[str, list]]:
    """(the datasets, ``pretrained`` value -> experiment ids) of the experiments of ``scale``."""
    data: dict[tuple[str, str], DataNeed] = {}
    for exp in all_experiments(scale).values():
        if dataset and exp.dataset != dataset:
            continue
        cfg = exp.config
        if cfg.data.synthetic is None:
            key = (cfg.data.dataset, str(cfg.data.root))
            old = data.get(key)
            splits = tuple(dict.fromkeys((old.splits if old else ()) + _splits(cfg.data)))
            # ap_th_pan is evaluated where an instances JSON is present; the paper reports it.
            data[key] = DataNeed(cfg.data.dataset, Path(cfg.data.root), splits, True)
    return list(data.values()), pretrained_weights(scale, dataset)


def _splits(data_cfg) -> tuple[str, ...]:
    return (data_cfg.train_split, data_cfg.val_split)


def check_scale(scale: str, dataset: str | None = None, log: Callable[[str], None] = print) -> None:
    """Raise :class:`MissingInput` naming the first missing input of the scale's experiments."""
    needs, weights = scale_needs(scale, dataset)
    for need in needs:
        counts = check_layout(
            need.dataset,
            need.root,
            need.splits,
            instances=need.instances and need.dataset == "coco_panoptic",
        )
        shown = ", ".join(f"{s} {n}" for s, n in counts.items())
        log(f"check-data: {need.dataset} at {need.root}: complete ({shown} images)")
    for spec, users in weights.items():
        ok, where = weights_present(spec)
        if not ok:
            if spec.startswith(TIMM_PREFIX):
                what = f"pretrained weights {spec} of {len(users)} experiment(s), e.g. {users[0]}"
                raise MissingInput(where, what, f"hcformer fetch-weights --dir {where.parent}")
            raise MissingInput(
                where, "model.backbone.pretrained of " + users[0], "a checkpoint file"
            )
        log(f"check-data: {spec}: {where}")
