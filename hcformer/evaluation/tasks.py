"""Which metrics each task uses: the one line to add a metric to a task.

The dataset's task (``data.task``: ``semantic``, ``panoptic``, ``instance``) picks the metric
classes of :mod:`hcformer.evaluation.metrics` below; each one whose ``applies`` holds for the
evaluation is built, fed every validation image and finished, in this order, and their scores
are merged into ``metrics.json`` in this order. A new metric is one class (``add``, ``finish``)
plus its name in the tuples of the tasks it scores.
"""

from __future__ import annotations

from hcformer.errors import ConfigError
from hcformer.evaluation.metrics import (
    EvalContext,
    InstanceAP,
    Metric,
    PanopticQuality,
    PanopticSemantic,
    PanopticThingAP,
    SemanticSegmentation,
    Undersegmentation,
    Visual,
)

TASK_METRICS: dict[str, tuple[type[Metric], ...]] = {
    "semantic": (SemanticSegmentation, Undersegmentation, Visual),
    "panoptic": (PanopticQuality, PanopticThingAP, PanopticSemantic, Undersegmentation, Visual),
    "instance": (InstanceAP, Undersegmentation, Visual),
}


def build_metrics(task: str, ctx: EvalContext) -> list[Metric]:
    """The metric objects of ``task`` that apply to this evaluation, in :data:`TASK_METRICS`
    order."""
    if task not in TASK_METRICS:
        raise ConfigError(
            f"data.task: {task!r} has no metrics (expected one of {sorted(TASK_METRICS)})"
        )
    return [cls(ctx) for cls in TASK_METRICS[task] if cls.applies(ctx)]
