"""The registry of model families: one entry makes a backbone known to the whole package.

A toy backbone family registered in the test (its builder in this module) must be accepted by
config validation, named in experiment ids by its token, given its paper settings and its tiny
shrink by the scales, and built by ``build_model``; everything that asks whether a head is
per-pixel gets the same answer from the head entries.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hcformer import experiments as ex
from hcformer import families
from hcformer.config import build_config
from hcformer.errors import ConfigError
from hcformer.families import BackboneEntry, BackboneFamily, HeadEntry
from hcformer.models import build_model
from hcformer.models.backbones import build_backbone
from hcformer.models.backbones.resnet import ResNetBackbone, build_resnet

ROOT = Path(__file__).resolve().parents[1]
BUILT: list[str] = []


def build_toy(cfg, entry, *, norm_all_features=False):
    """The toy family's builder: a ResNet trunk, recorded so the test sees the registry used it."""
    BUILT.append(cfg.name)
    return build_resnet(cfg, entry, norm_all_features=norm_all_features)


TOY = BackboneEntry(
    name="toynet",
    token="toy",
    family=BackboneFamily(
        name="Toy", builder=f"{__name__}:build_toy", shape_keys=("depths", "widths", "stem_width")
    ),
    timm_model="resnet50",
    size={"depths": [2, 2, 2, 2], "widths": [64, 128, 256, 512], "stem_width": 64},
    pretrained="timm:toy_weights.in1k",
    tiny={"depths": [1, 1, 1, 1], "widths": [8, 16, 32, 64], "stem_width": 8},
    drop_path=0.2,
)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> BackboneEntry:
    monkeypatch.setitem(families.BACKBONES, TOY.name, TOY)
    BUILT.clear()
    return TOY


def test_config_accepts_a_name_once_it_is_registered(monkeypatch: pytest.MonkeyPatch):
    model = {"model": {"backbone": {"name": "toynet"}}}
    with pytest.raises(ConfigError, match=r"model\.backbone\.name: 'toynet' is not one of \["):
        build_config(model)
    monkeypatch.setitem(families.BACKBONES, TOY.name, TOY)
    assert build_config(model).model.backbone.name == "toynet"


def test_a_registered_backbone_gets_ids_settings_shrink_and_a_model(
    toy: BackboneEntry, tmp_path: Path
):
    root = tmp_path / "experiments"
    shutil.copytree(ROOT / "experiments", root)
    table = root / "tables" / "table5.yaml"
    table.write_text(
        table.read_text().replace(
            "{label: HCFormer R50 L1, set: {model.backbone.hierarchy_level: 1}}",
            "{label: HCFormer R50 L1, set: {model.backbone.hierarchy_level: 1, "
            "model.backbone.name: toynet, model.backbone.dcnv2: false}}",
        )
    )
    exp_id = "coco_panoptic/hcformer-toy-L1-D8-Q100"  # the token; no -nodcn: no DCN in Toy
    assert ex.load_table("table5", root).row("HCFormer R50 L1").experiment_ids == [exp_id]
    paper = ex.all_experiments("paper", root=root)[exp_id].config.model.backbone
    assert (paper.pretrained, paper.drop_path) == ("timm:toy_weights.in1k", 0.2)
    assert paper.dcnv2 is True  # irrelevant for Toy: normalised to the default
    assert paper.depths is None  # the entry's size is the paper size
    cfg = ex.all_experiments("tiny", root=root)[exp_id].config
    backbone = cfg.model.backbone
    assert (backbone.depths, backbone.widths, backbone.stem_width) == (
        [1, 1, 1, 1],
        [8, 16, 32, 64],
        8,
    )
    assert backbone.pretrained == "" and backbone.drop_path == 0.0  # the tiny scale's common keys

    model = build_model(cfg.model)
    assert BUILT == ["toynet"] and isinstance(model.backbone, ResNetBackbone)
    assert model.backbone.out_channels["res5"] == 64 * 4  # bottleneck expansion of the tiny width
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 64, 64) * 255)
    assert out["pred_masks"].shape == (1, 100, 4, 4)  # stride 16 at L = 1


def test_family_checks_read_the_registry(toy: BackboneEntry):
    cfg = build_config(
        {"model": {"backbone": {"name": "toynet", "output_stride": 8, "hierarchy_level": 0}}}
    )
    with pytest.raises(ConfigError, match=r"output_stride: 8 \(dilated\) is for ResNets only"):
        build_backbone(cfg.model.backbone)
    cfg = build_config({"model": {"backbone": {"name": "toynet", "embed_dim": 8}}})
    with pytest.raises(ConfigError, match=r"embed_dim: applies to Swin backbones only"):
        build_backbone(cfg.model.backbone)


def test_per_pixel_is_the_head_entries_kind(monkeypatch: pytest.MonkeyPatch):
    from hcformer.losses import PerPixelCriterion, SetCriterion, build_criterion
    from hcformer.tracking.tracker import method

    per_pixel = sorted(t for t, e in families.HEADS.items() if e.per_pixel)
    assert per_pixel == ["deeplabv3", "fcn32s", "fpn", "pspnet"]  # Table I's baselines
    assert isinstance(build_criterion(build_config({"model": {"head": {"type": "fpn"}}})),
                      PerPixelCriterion)  # fmt: skip
    monkeypatch.setitem(
        families.HEADS, "fpn", HeadEntry("fpn", "mask", "hcformer.models.perpixel:build_perpixel")
    )
    assert isinstance(build_criterion(build_config({"model": {"head": {"type": "fpn"}}})),
                      SetCriterion)  # fmt: skip
    config = {"model": {"head": {"type": "pspnet"}, "backbone": {"hierarchy_level": 3}}}
    assert method(config) == "hc-pspnet"
    assert method({"model": {"head": {"type": "fpn"}}}) == "fpn"
    assert method({"model": {"head": {"type": "maskformer", "encoder_layers": 6}}}) == "maskformer+"
