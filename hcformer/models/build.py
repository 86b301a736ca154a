"""``build_model``: the one builder from the typed config to an assembled model.

Every model family lives in its own file and is registered, with its builder, in
:data:`hcformer.families.HEADS`; ``build_model`` dispatches on ``model.head.type`` through that
registry. This file also holds what the mask-classification builders share: the check of a list
of keys, and the query decoder and the res5 encoder built from ``model.head``.
"""

from __future__ import annotations

from torch import nn

from hcformer.config import ModelConfig
from hcformer.errors import ConfigError
from hcformer.families import HEADS, load

# (condition, dotted key, value, what was expected): a check of one config key.
Check = tuple[bool, str, object, str]


def check_keys(checks: list[Check]) -> None:
    """Raise ConfigError naming the key of the first failed check."""
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is invalid; expected {expected}")


def query_decoder(cfg: ModelConfig, decoder_cls: type[nn.Module]) -> nn.Module:
    """The transformer decoder of ``cfg.model.head`` (``MaskedAttentionDecoder`` or
    ``StandardDecoder``): queries, layers, heads, widths and dropout as the head config names."""
    head = cfg.head
    return decoder_cls(
        hidden_dim=head.hidden_dim,
        num_classes=cfg.num_classes,
        num_queries=head.queries,
        num_layers=head.decoder_layers,
        nheads=head.nheads,
        dim_feedforward=head.dim_feedforward,
        dropout=head.decoder_dropout,
        mask_dim=head.mask_dim,
    )


def res5_encoder(
    cfg: ModelConfig, encoder_cls: type[nn.Module], in_channels: int, d_model: int
) -> nn.Module | None:
    """The transformer encoder on res5 (``in_channels`` wide) that ``model.head.encoder_layers``
    asks for, None at 0: HCFormer+'s (at hidden_dim) or MaskFormer's pixel decoder's (at
    pixel_decoder_dim)."""
    head = cfg.head
    if head.encoder_layers == 0:
        return None
    return encoder_cls(
        in_channels=in_channels,
        d_model=d_model,
        num_layers=head.encoder_layers,
        nheads=head.nheads,
        dim_feedforward=head.dim_feedforward,
        dropout=head.encoder_dropout,
    )


def build_model(cfg: ModelConfig) -> nn.Module:
    """Assemble the model that ``cfg`` describes (random init; the backbone may load weights).

    Raises ConfigError naming the key for a head type not registered or a bad combination.
    Build on the ``meta`` device (``with torch.device("meta"):``) to count parameters fast.
    """
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"build_model expects the model part of the config, got {type(cfg)}")
    entry = HEADS.get(cfg.head.type)
    if entry is None:
        raise ConfigError(
            f"model.head.type: {cfg.head.type!r} is not built yet; built: {sorted(HEADS)}"
        )
    return load(entry.builder)(cfg)
