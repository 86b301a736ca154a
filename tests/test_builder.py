"""build_model: dispatch, config errors, and the paper's parameter counts.

Counts are taken on the ``meta`` device (no memory, no init cost). The references are the
numbers the paper prints (Tables 1, 5, 6 of the main paper = tables.yaml table1/table5/table6,
table VI of the appendix) and the authors' hand count of 38.4M (HCFormer R50) and 45.8M
(HCFormer+ R50) from the implementation notes. Tolerance: 1.0M (1% for Swin-L).
"""

from __future__ import annotations

import pytest
import torch

from hcformer.config import build_config
from hcformer.errors import ConfigError
from hcformer.models import build_model


def count(model_cfg: dict, trainable: bool = False) -> float:
    cfg = build_config({"model": model_cfg})
    with torch.device("meta"):
        model = build_model(cfg.model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable) / 1e6


def r50(**head) -> dict:
    return {"backbone": {"name": "resnet50"}, "head": head, "num_classes": 133}


def test_hcformer_r50_matches_hand_count():
    assert count(r50()) == pytest.approx(38.4, abs=1.0)


def test_hcformer_plus_r50_matches_hand_count():
    assert count(r50(encoder_layers=6)) == pytest.approx(45.8, abs=1.0)


@pytest.mark.parametrize("encoder_layers,hand", [(0, 38.4), (6, 45.8)])
def test_hand_counts_to_the_digit_without_frozen_bn_affine(encoder_layers, hand):
    """The authors' detectron2 FrozenBatchNorm keeps its affine weights as buffers: without the
    frozen BN weights/biases (0.053M in R50) the count equals the hand count to 0.05M."""
    assert count(r50(encoder_layers=encoder_layers), trainable=True) == pytest.approx(
        hand, abs=0.05
    )


@pytest.mark.parametrize("layers,paper", [(1, 27), (2, 29), (4, 32), (8, 38), (16, 51)])
def test_decoder_layers_table6(layers, paper):
    assert count(r50(decoder_layers=layers)) == pytest.approx(paper, abs=1.0)


@pytest.mark.parametrize("level,paper", [(0, 37), (1, 38), (2, 38), (3, 38)])
@pytest.mark.parametrize("dcnv2", [True, False])
def test_hierarchy_level_table5(level, paper, dcnv2):
    cfg = r50()
    cfg["backbone"].update(hierarchy_level=level, dcnv2=dcnv2)
    assert count(cfg) == pytest.approx(paper, abs=1.0)


D, FFN = 256, 2048
ATTN = 4 * D * D + 4 * D  # q, k, v, out projections with biases
FFN_PARAMS = D * FFN + FFN + FFN * D + D
DECODER_LAYER = 2 * ATTN + FFN_PARAMS + 3 * 2 * D  # cross-, self-attention, FFN, 3 LayerNorms
ENCODER_LAYER = ATTN + FFN_PARAMS + 2 * 2 * D


def _head_by_hand(in_channels: int, queries: int, classes: int, layers: int) -> int:
    """input_proj + mask_proj + the masked decoder, counted from the notes' description."""
    proj = in_channels * D + D
    input_proj = 0 if in_channels == D else proj  # identity on a map of the decoder's width
    embeddings = 2 * queries * D + D  # query features, query positions, level embedding
    heads = (D + 1) * (classes + 1) + 3 * (D * D + D) + 2 * D  # class, mask MLP, decoder norm
    return input_proj + proj + layers * DECODER_LAYER + embeddings + heads


def _head_count(model_cfg: dict) -> int:
    cfg = build_config({"model": model_cfg})
    with torch.device("meta"):
        model = build_model(cfg.model)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))


@pytest.mark.parametrize("layers", [1, 8])
def test_head_matches_an_independent_hand_count(layers):
    assert _head_count(r50(decoder_layers=layers)) == _head_by_hand(2048, 100, 133, layers)
    swin_l = {"backbone": {"name": "swin_l"}, "head": {"queries": 200}, "num_classes": 150}
    assert _head_count(swin_l) == _head_by_hand(1536, 200, 150, 8)
    # Table III's standard decoder: no query features and no level embedding.
    standard = _head_count(r50(decoder="standard", decoder_layers=9))
    assert standard == _head_by_hand(2048, 100, 133, 9) - 100 * D - D


def test_encoder_adds_what_the_notes_describe():
    """HCFormer+ - HCFormer = encoder (1x1 conv + GroupNorm + 6 layers) - the projections saved
    by reading a 256-channel map."""
    encoder = 2048 * D + D + 2 * D + 6 * ENCODER_LAYER
    saved = (2048 * D + D) + (2048 - 256) * D  # input_proj gone, mask_proj from 256 channels
    diff = (count(r50(encoder_layers=6)) - count(r50())) * 1e6
    assert diff == pytest.approx(encoder - saved, abs=0.5)


@pytest.mark.parametrize("encoder_layers,paper", [(0, 62), (6, 70)])
def test_swin_s(encoder_layers, paper):
    cfg = {
        "backbone": {"name": "swin_s"},
        "head": {"encoder_layers": encoder_layers},
        "num_classes": 133,
    }
    assert count(cfg) == pytest.approx(paper, abs=1.0)


@pytest.mark.parametrize("encoder_layers,paper", [(0, 210), (6, 217)])
def test_swin_l(encoder_layers, paper):
    cfg = {
        "backbone": {"name": "swin_l"},
        "head": {"encoder_layers": encoder_layers, "queries": 200},
        "num_classes": 133,
    }
    assert count(cfg) == pytest.approx(paper, rel=0.01)


# ---------------------------------------------------------------------------------------
# Errors.


def _build(model_cfg: dict):
    return build_model(build_config({"model": model_cfg}).model)


@pytest.mark.parametrize(
    "head,backbone,message",
    [
        ({"queries": 0}, {}, r"model\.head\.queries: 0 is invalid; expected an integer >= 1"),
        ({"decoder_layers": 0}, {}, r"model\.head\.decoder_layers: 0 is invalid; expected >= 1"),
        ({"encoder_layers": -1}, {}, r"model\.head\.encoder_layers: -1 is invalid; expected >= 0"),
        ({"nheads": 5}, {}, r"model\.head\.nheads: 5 does not divide model\.head\.hidden_dim 256"),
        ({"hidden_dim": 30}, {}, r"model\.head\.hidden_dim: 30 is invalid; expected a positive"),
        ({}, {"hierarchy_level": 4}, r"model\.backbone\.hierarchy_level: 4 .*one of 0, 1, 2, 3"),
        ({}, {"hierarchy_level": -1}, r"model\.backbone\.hierarchy_level: -1"),
        ({}, {"output_stride": 8}, r"model\.backbone\.output_stride: 8 .*32 for head type"),
    ],
)
def test_bad_combinations_name_the_key(head, backbone, message):
    with pytest.raises(ConfigError, match=message), torch.device("meta"):
        _build({"head": head, "backbone": backbone})


def test_unregistered_head_type_is_not_built_yet(monkeypatch):
    from hcformer import families

    cfg = build_config({"model": {"head": {"type": "maskformer"}}}).model
    monkeypatch.delitem(families.HEADS, "maskformer")
    with pytest.raises(ConfigError, match=r"model\.head\.type: 'maskformer' is not built yet"):
        build_model(cfg)
    with pytest.raises(ConfigError, match=r"model\.head\.type: 'maskformer' is not one of"):
        build_config({"model": {"head": {"type": "maskformer"}}})


def test_misspelt_keys_fail_in_build_config():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.head\.querys'.*'queries'"):
        build_config({"model": {"head": {"querys": 10}}})
    with pytest.raises(ConfigError, match=r"model\.head\.decoder: 'masks' is not one of"):
        build_config({"model": {"head": {"decoder": "masks"}}})
    with pytest.raises(ConfigError, match=r"model\.head\.queries: expected an integer"):
        build_config({"model": {"head": {"queries": "many"}}})


def test_build_model_wants_the_model_config():
    with pytest.raises(ConfigError, match="model part of the config"):
        build_model(build_config({}))
