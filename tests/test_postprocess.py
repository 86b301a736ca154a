"""Semantic, panoptic and instance inference on hand-made outputs (MaskFormer, App. A)."""

from __future__ import annotations

import math

import pytest
import torch

from hcformer.models.postprocess import (
    instance_inference,
    panoptic_inference,
    resize_to_original,
    semantic_inference,
    upsample_to_input,
)

BIG = 10.0


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Class logits whose softmax is exactly ``probs`` (rows sum to 1)."""
    return torch.tensor(probs).log()


def test_semantic_inference_is_sum_of_class_prob_times_mask_prob():
    torch.manual_seed(0)
    cls = torch.randn(3, 5)
    masks = torch.randn(3, 4, 6)
    out = semantic_inference(cls, masks)
    assert out.shape == (4, 4, 6)
    p = cls.softmax(-1)
    for c in range(4):
        ref = sum(p[q, c] * masks[q].sigmoid() for q in range(3))
        torch.testing.assert_close(out[c], ref)


def square(h, w, y0, y1, x0, x1, inside=BIG, outside=-BIG):
    m = torch.full((h, w), outside)
    m[y0:y1, x0:x1] = inside
    return m


def test_panoptic_thresholds_overlap_and_stuff_merging():
    h = w = 8
    # classes: 0, 1 things; 2 stuff; K = 3 (+ no object)
    cls = logits_for(
        [
            [0.95, 0.02, 0.02, 0.01],  # q0: thing 0, left half
            [0.01, 0.01, 0.97, 0.01],  # q1: stuff 2, top right
            [0.01, 0.01, 0.90, 0.08],  # q2: stuff 2, bottom right -> merged with q1
            [0.50, 0.40, 0.05, 0.05],  # q3: below the 0.8 object threshold -> dropped
            [0.02, 0.02, 0.01, 0.95],  # q4: no object -> dropped
            [0.01, 0.85, 0.13, 0.01],  # q5: thing 1 mostly under q0 -> overlap < 0.8, dropped
        ]
    )
    masks = torch.stack(
        [
            square(h, w, 0, 8, 0, 4),
            square(h, w, 0, 4, 5, 8),
            square(h, w, 4, 8, 5, 8),
            square(h, w, 0, 8, 0, 8),
            square(h, w, 0, 8, 0, 8),
            square(h, w, 0, 8, 2, 5),  # 24 px, 8 of them outside q0 (x=4) -> 1/3 kept
        ]
    )
    pan, segments = panoptic_inference(cls, masks, thing_classes={0, 1})
    assert pan.dtype == torch.int32 and pan.shape == (h, w)
    assert [(s["id"], s["category"], s["isthing"]) for s in segments] == [
        (1, 0, True),
        (2, 2, False),
    ]
    assert (pan[:, :4] == 1).all()
    assert (pan[:, 5:] == 2).all()  # q1 and q2: one stuff segment
    assert (pan[:, 4] == 0).all()  # q5 owns only column 4: 8 of its 24 pixels < 0.8 -> dropped
    assert segments[1]["area"] == 24 and segments[0]["area"] == 32
    assert segments[0]["score"] == pytest.approx(0.95, rel=1e-5)
    # A stricter overlap threshold cannot remove q0 (it keeps all of its mask); a looser one keeps q5.
    _, loose = panoptic_inference(cls, masks, thing_classes={0, 1}, overlap_threshold=0.3)
    assert [s["category"] for s in loose] == [0, 2, 1]
    assert (
        loose_map := panoptic_inference(cls, masks, thing_classes={0, 1}, overlap_threshold=0.3)[0]
    )[0, 4] == 3
    assert (loose_map[:, 4] == 3).all()
    _, none = panoptic_inference(cls, masks, thing_classes={0, 1}, object_mask_threshold=0.99)
    assert none == []


def test_panoptic_mask_threshold_half():
    cls = logits_for([[0.9, 0.1]])
    masks = torch.full((1, 2, 2), -1.0)
    masks[0, 0, 0] = 0.0  # sigmoid = 0.5 exactly: counts as inside (mask >= 0.5)
    pan, segs = panoptic_inference(cls, masks, thing_classes={0})
    assert pan.tolist() == [[1, 0], [0, 0]] and segs[0]["area"] == 1


def test_instance_topk_scores_and_thing_filter():
    cls = logits_for([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])  # K = 2
    masks = torch.stack([square(4, 4, 0, 2, 0, 2, 2.0, -3.0), square(4, 4, 2, 4, 0, 4, 1.0, -1.0)])
    out = instance_inference(cls, masks, topk=3)
    got = sorted(
        zip(out["scores"].tolist(), out["labels"].tolist(), [m.sum().item() for m in out["masks"]]),
        reverse=True,
    )
    s2, s1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0))
    expected = sorted([(0.6 * s2, 0, 4), (0.7 * s1, 1, 8), (0.3 * s2, 1, 4)], reverse=True)
    assert len(got) == 3
    for (gs, gl, ga), (es, el, ea) in zip(got, expected):
        assert gs == pytest.approx(es, rel=1e-5) and gl == el and ga == ea
    only0 = instance_inference(cls, masks, topk=3, thing_classes={0})
    assert only0["labels"].tolist() == [0] and only0["masks"].shape == (1, 4, 4)
    many = instance_inference(cls, masks, topk=100)
    assert many["scores"].numel() == 4  # Q x K pairs at most


def test_resize_crop_and_upsample():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    up = upsample_to_input(x, (32, 32))
    assert up.shape == (1, 2, 32, 32)
    # align_corners=False keeps block averages: the mean is preserved for a linear ramp.
    assert up.mean() == pytest.approx(float(x.mean()), rel=1e-5)
    same = resize_to_original(x[0], (6, 5), (6, 5))
    assert torch.equal(same, x[0, :, :6, :5])
    out = resize_to_original(x[0], (6, 5), (12, 10))
    assert out.shape == (2, 12, 10)


@pytest.mark.parametrize("level", [1, 2])
@torch.no_grad()
def test_masks_below_level3_are_resized_once_to_the_padded_input(level):
    """HCFormer at L < 3 outputs its masks at stride 32 / 2**L; inference resizes them ONCE
    (bilinear, align_corners=False) to the padded input, as the authors' inference does, not
    through 2x steps to stride 4 and then x4."""
    import torch.nn.functional as F

    from hcformer.config import build_config
    from hcformer.models import build_model
    from hcformer.ops import reference

    backbone = {"name": "resnet50", "depths": [1, 1, 1, 1], "widths": [8, 16, 32, 64],
                "stem_width": 8, "cluster_dim": 16, "hierarchy_level": level}  # fmt: skip
    head = {"hidden_dim": 32, "nheads": 4, "dim_feedforward": 64, "mask_dim": 32, "queries": 6,
            "decoder_layers": 1}  # fmt: skip
    cfg = build_config({"model": {"backbone": backbone, "head": head, "num_classes": 3}})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    captured = {}
    model.decoder.register_forward_hook(lambda m, i, o: captured.update(out=o))
    padded = (64, 96)
    x = torch.rand(1, 3, *padded, generator=torch.Generator().manual_seed(1)) * 255
    out = model(x)
    coarse = captured["out"][1][-1]
    for a in reversed(out["assignments"]):
        coarse = reference.decode(coarse, a)
    stride = 32 >> level
    assert out["pred_masks"].shape[-2:] == (padded[0] // stride, padded[1] // stride)
    got = upsample_to_input(out["pred_masks"], padded)
    want = F.interpolate(coarse, size=padded, mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    steps = coarse
    for _ in range(3 - level):
        steps = F.interpolate(steps, scale_factor=2.0, mode="bilinear", align_corners=False)
    former = F.interpolate(steps, scale_factor=4.0, mode="bilinear", align_corners=False)
    assert (former - got).abs().max() > 1e-3  # the two resizings differ
