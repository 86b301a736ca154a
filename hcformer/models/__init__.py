"""Models of hcformer: backbones with clustering modules, heads, and the one builder.

``build_model(cfg.model)`` assembles any model of the paper from the typed config.
"""

from hcformer.models.build import build_model

__all__ = ["build_model"]
