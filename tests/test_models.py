"""HCFormer / HCFormer+: the decoders, the encoder, output contract, gradients, odd sizes.

Forward passes use tiny widths (hidden 32, 4 heads, 8 queries, 2 layers, a [1,1,1,1] ResNet);
parameter counts of the paper sizes live in test_builder.py (meta device).
"""

from __future__ import annotations

import math

import pytest
import torch

from hcformer.config import build_config
from hcformer.models import build_model, clustering
from hcformer.models.clustering import decode_masks
from hcformer.models.encoder import TransformerEncoder
from hcformer.models.hcformer import HCFormer, set_masks
from hcformer.models.position_encoding import PositionEmbeddingSine
from hcformer.models.transformer_decoder import (
    MaskedAttentionDecoder,
    StandardDecoder,
    attention_mask,
)
from hcformer.ops import reference

torch.set_num_threads(1)

TINY_BACKBONE = {
    "name": "resnet50",
    "depths": [1, 1, 1, 1],
    "widths": [8, 16, 32, 64],
    "stem_width": 8,
    "cluster_dim": 16,
}
TINY_HEAD = {
    "hidden_dim": 32,
    "nheads": 4,
    "dim_feedforward": 64,
    "mask_dim": 32,
    "queries": 8,
    "decoder_layers": 2,
}


def tiny_model(num_classes: int = 5, head: dict | None = None, backbone: dict | None = None):
    cfg = build_config(
        {
            "model": {
                "backbone": {**TINY_BACKBONE, **(backbone or {})},
                "head": {**TINY_HEAD, **(head or {})},
                "num_classes": num_classes,
            }
        }
    )
    torch.manual_seed(0)
    return build_model(cfg.model)


def images(b: int = 2, h: int = 96, w: int = 160, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 255


# ---------------------------------------------------------------------------------------
# Position encoding: against the DETR formula written out element by element.


def test_position_encoding_matches_formula():
    n, h, w = 4, 2, 3
    pe = PositionEmbeddingSine(num_pos_feats=n, normalize=True)(torch.zeros(1, 5, h, w))
    assert pe.shape == (1, 2 * n, h, w)
    for y in range(h):
        for x in range(w):
            for axis, coord, size in ((0, y, h), (1, x, w)):
                p = (coord + 1) / size * 2 * math.pi
                for i in range(n):
                    arg = p / 10000 ** (2 * (i // 2) / n)
                    want = math.sin(arg) if i % 2 == 0 else math.cos(arg)
                    assert pe[0, axis * n + i, y, x].item() == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------------------------------
# Masked attention.


def test_attention_mask_threshold_heads_and_empty_rows():
    logits = torch.tensor(
        [
            [
                [[1.0, -1.0], [-2.0, 3.0]],
                [[-1.0, -1.0], [-1.0, -1.0]],
            ],  # image 0: q0 mixed, q1 empty
            [[[-1.0, 1.0], [1.0, 1.0]], [[0.5, -0.5], [-0.5, -0.5]]],  # image 1
        ]
    )  # [B=2, Q=2, 2, 2]
    m = attention_mask(logits, nheads=3)
    assert m.shape == (6, 2, 4) and m.dtype == torch.bool
    # sigmoid(logit) < 0.5 is masked; a query masked everywhere is unmasked entirely.
    want = torch.tensor(
        [
            [[False, True, True, False], [False, False, False, False]],
            [[True, False, False, False], [False, True, True, True]],
        ]
    )
    for b in range(2):
        for head in range(3):  # batch-major, as nn.MultiheadAttention indexes b * nheads + h
            assert torch.equal(m[b * 3 + head], want[b])


def _one_query_decoder(pattern: torch.Tensor):
    """A 1-layer decoder with one query, and mask features whose stride-32 mask for that query
    (before layer 1) is positive where ``pattern`` is True and negative elsewhere."""
    torch.manual_seed(0)
    dec = MaskedAttentionDecoder(
        hidden_dim=8,
        num_classes=3,
        num_queries=1,
        num_layers=1,
        nheads=2,
        dim_feedforward=16,
        mask_dim=4,
    ).eval()
    with torch.no_grad():
        e = dec.mask_embed(dec.decoder_norm(dec.query_feat.weight))[0]  # [mask_dim]
    sign = pattern.float() * 2 - 1  # [h, w]
    mask_features = (e[:, None, None] * sign).unsqueeze(0)  # logit = |e|^2 * sign
    return dec, mask_features


@torch.no_grad()
def test_masked_attention_ignores_background_memory():
    h, w = 2, 3
    pattern = torch.tensor([[True, False, True], [False, False, True]])
    dec, mask_features = _one_query_decoder(pattern)
    src = torch.randn(1, 8, h, w)
    pos = torch.randn(1, 8, h, w)
    logits, masks = dec(src, pos, mask_features)
    assert logits.shape == (2, 1, 1, 4) and masks.shape == (2, 1, 1, h, w)
    assert torch.equal(masks[0, 0, 0] > 0, pattern)  # the set-up gives the intended mask

    # Memory at background positions is not attended: changing it changes nothing.
    bg = src.clone()
    bg[:, :, ~pattern] += 10 * torch.randn(8, int((~pattern).sum()))
    logits_bg, _ = dec(bg, pos, mask_features)
    torch.testing.assert_close(logits_bg, logits, rtol=0, atol=1e-6)

    # Memory at a foreground position is attended.
    fg = src.clone()
    fg[0, :, 0, 0] += 10
    logits_fg, _ = dec(fg, pos, mask_features)
    assert (logits_fg[1] - logits[1]).abs().max() > 1e-3


@torch.no_grad()
def test_fully_masked_query_attends_everywhere():
    h, w = 2, 3
    dec, empty = _one_query_decoder(torch.zeros(h, w, dtype=torch.bool))
    _, full = _one_query_decoder(torch.ones(h, w, dtype=torch.bool))
    src, pos = torch.randn(1, 8, h, w), torch.randn(1, 8, h, w)
    # An all-background mask is unmasked, so layer 1 attends exactly as with nothing masked.
    logits_empty, _ = dec(src, pos, empty)
    logits_full, _ = dec(src, pos, full)
    assert torch.isfinite(logits_empty).all()
    torch.testing.assert_close(logits_empty[1], logits_full[1], rtol=0, atol=1e-6)


def test_decoders_prediction_sets():
    kw = dict(hidden_dim=16, num_classes=4, num_queries=5, nheads=2, dim_feedforward=32, mask_dim=8)
    src, pos, mf = torch.randn(2, 16, 3, 4), torch.randn(2, 16, 3, 4), torch.randn(2, 8, 3, 4)
    logits, masks = MaskedAttentionDecoder(num_layers=3, **kw)(src, pos, mf)
    assert logits.shape == (4, 2, 5, 5) and masks.shape == (4, 2, 5, 3, 4)  # layers + 1 sets
    logits, masks = StandardDecoder(num_layers=3, **kw)(src, pos, mf)
    assert logits.shape == (3, 2, 5, 5) and masks.shape == (3, 2, 5, 3, 4)  # one per layer


# ---------------------------------------------------------------------------------------
# HCFormer+ encoder.


def test_encoder_shapes_and_position_dependence():
    torch.manual_seed(0)
    enc = TransformerEncoder(in_channels=12, d_model=32, num_layers=2, nheads=4, dim_feedforward=64)
    enc.eval()
    x = torch.randn(2, 12, 3, 5)
    y = enc(x)
    assert y.shape == (2, 32, 3, 5)
    # Self-attention over the whole map: a change at one cell reaches every other cell.
    x2 = x.clone()
    x2[:, :, 0, 0] += 5
    diff = (enc(x2) - y).abs().amax(dim=1)
    assert (diff[:, 2, 4] > 1e-4).all()


# ---------------------------------------------------------------------------------------
# The assembled model.


@pytest.mark.parametrize("size", [(96, 160), (160, 96)])
def test_output_contract_train_and_eval(size):
    h, w = size
    model = tiny_model(num_classes=5)
    x = images(2, h, w)
    model.train()
    out = model(x)
    assert out["pred_logits"].shape == (2, 8, 6)
    # 3 x 5 stride-32 cells, fewer than the 3 sets x 8 queries: in training every set holds its
    # logits as coefficients over the cells' decoded one-hot maps (one basis for all sets).
    cells = (h // 32) * (w // 32)
    assert "pred_masks" not in out
    assert out["mask_coefficients"].shape == (2, 8, cells)
    assert out["mask_basis"].shape == (2, cells, h // 4, w // 4)
    assert set_masks(out).shape == (2, 8, h // 4, w // 4)
    assert len(out["aux_outputs"]) == 2  # decoder_layers (plus the final set = layers + 1)
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 8, 6)
        assert aux["mask_basis"] is out["mask_basis"]
        assert set_masks(aux).shape == (2, 8, h // 4, w // 4)
    # Assignments fine to coarse (strides 4->8, 8->16, 16->32) and one scale per module.
    shapes = [tuple(a.shape) for a in out["assignments"]]
    assert shapes == [(2, 9, h // 4, w // 4), (2, 9, h // 8, w // 8), (2, 9, h // 16, w // 16)]
    assert len(out["cluster_scales"]) == 3
    assert all(s.dim() == 0 and s.requires_grad for s in out["cluster_scales"])

    model.eval()
    with torch.no_grad():
        ev = model(x)
    assert ev["pred_logits"].shape == (2, 8, 6)
    assert ev["pred_masks"].shape == (2, 8, h // 4, w // 4)
    assert ev["aux_outputs"] == []


@pytest.mark.parametrize("factorised", [True, False])
@torch.no_grad()
def test_every_set_is_decoded_like_the_final_one(factorised, monkeypatch):
    """Every training set's stride-4 logits (dense, or coefficients over the cells' basis) ==
    decoding its stride-32 masks alone, level by level (eq. 5, per set)."""
    monkeypatch.setattr(HCFormer, "factorised_training_masks", factorised)
    model = tiny_model()
    captured = {}
    model.decoder.register_forward_hook(lambda m, i, o: captured.update(out=o))
    model.train()
    out = model(images(2, 64, 96))
    logits32, masks32 = captured["out"]
    assert masks32.shape == (3, 2, 8, 2, 3)
    assert ("pred_masks" in out) is not factorised
    sets = [*out["aux_outputs"], out]
    with monkeypatch.context() as m:
        m.setattr(clustering, "BASIS_DECODE_MAX_CELLS", 0)  # the reference: level by level
        wants = [decode_masks(masks32[i], out["assignments"]) for i in range(len(sets))]
    for i, s in enumerate(sets):
        torch.testing.assert_close(s["pred_logits"], logits32[i])
        torch.testing.assert_close(set_masks(s), wants[i], rtol=1e-5, atol=1e-5)
    # No dropout and frozen BN: eval decodes the same final prediction.
    ev = model.eval()(images(2, 64, 96))
    torch.testing.assert_close(ev["pred_masks"], set_masks(out), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev["pred_logits"], out["pred_logits"])


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_hierarchy_level(level):
    model = tiny_model(backbone={"hierarchy_level": level}).train()
    out = model(images(1, 64, 64))
    # Masks at stride 32 / 2**L: decoded through the L modules only, as the authors' code.
    side = 2 << level
    assert set_masks(out).shape == (1, 8, side, side)
    assert all(set_masks(aux).shape == (1, 8, side, side) for aux in out["aux_outputs"])
    assert len(out["assignments"]) == len(out["cluster_scales"]) == level
    # The modules sit at the last `level` downsamplings: the coarsest is 16 -> 32 (2x2 here).
    assert [a.shape[-1] for a in out["assignments"]] == [16, 8, 4][3 - level :]
    with torch.no_grad():
        assert model.eval()(images(1, 64, 64))["pred_masks"].shape == (1, 8, side, side)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("factorised", [True, False])
@torch.no_grad()
def test_levels_decode_eq5_only_and_training_sets_equal_eval(level, factorised, monkeypatch):
    """At every level the masks are eq. (5) through the L modules present, nothing more (no
    bilinear steps: stride 32 / 2**L); the factorised training sets (tiny scale) equal the
    dense ones and the eval output."""
    monkeypatch.setattr(HCFormer, "factorised_training_masks", factorised)
    model = tiny_model(backbone={"hierarchy_level": level})
    captured = {}
    model.decoder.register_forward_hook(lambda m, i, o: captured.update(out=o))
    x = images(2, 64, 96)
    out = model.train()(x)
    masks32 = captured["out"][1]  # [S, B, Q, 2, 3]
    # The factorised form needs a module to decode through (L = 0: the masks are the output).
    assert ("mask_basis" in out) == (factorised and level > 0)
    for i, s in enumerate([*out["aux_outputs"], out]):
        want = masks32[i]
        for a in reversed(out["assignments"]):  # deepest module first
            want = reference.decode(want, a)
        assert want.shape[-2:] == (2 << level, 3 << level)
        torch.testing.assert_close(set_masks(s), want, rtol=1e-5, atol=1e-5)
    ev = model.eval()(x)
    torch.testing.assert_close(ev["pred_masks"], set_masks(out), rtol=1e-5, atol=1e-5)
    if level == 0:
        assert torch.equal(ev["pred_masks"], captured["out"][1][-1])


@torch.no_grad()
def test_level3_output_is_the_old_stride4_decoding_bit_for_bit():
    """L = 3 is unchanged by decoding only through the modules present: the output is exactly
    the former full decoding to stride 4 (levels_total=3), in eval and in training."""
    model = tiny_model()
    captured = {}
    model.decoder.register_forward_hook(lambda m, i, o: captured.update(out=o))
    x = images(2, 64, 96)
    ev = model.eval()(x)
    old = decode_masks(captured["out"][1][-1], ev["assignments"], levels_total=3)
    assert ev["pred_masks"].shape == (2, 8, 16, 24)
    assert torch.equal(ev["pred_masks"], old)
    tr = model.train()(x)
    basis = clustering.decode_basis(tr["assignments"], (2, 3), 3, batch_size=2)
    assert torch.equal(tr["mask_basis"], basis)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(HCFormer, "factorised_training_masks", False)
        dense = model(x)
    stacked = captured["out"][1].transpose(0, 1)
    old_sets = decode_masks(stacked, dense["assignments"], levels_total=3).unbind(1)
    for s, old_set in zip([*dense["aux_outputs"], dense], old_sets, strict=True):
        assert torch.equal(s["pred_masks"], old_set)


def test_hcformer_plus_and_standard_decoder_variants():
    plus = tiny_model(head={"encoder_layers": 2}).train()
    out = plus(images(1, 64, 96))
    assert set_masks(out).shape == (1, 8, 16, 24) and len(out["aux_outputs"]) == 2
    names = [n for n, _ in plus.named_parameters()]
    assert any(n.startswith("backbone.encoder.layers.1.") for n in names)
    # The encoder's output already has the decoder's width: input_proj is the identity.
    assert not any(n.startswith("input_proj.") for n in names)
    assert "mask_proj.weight" in names

    std = tiny_model(head={"decoder": "standard", "decoder_layers": 3}).train()
    out = std(images(1, 64, 96))
    assert set_masks(out).shape == (1, 8, 16, 24)
    assert len(out["aux_outputs"]) == 2  # one prediction per layer, no set from the queries
    assert not any("level_embed" in n or "query_feat" in n for n, _ in std.named_parameters())


def test_swin_backbone_feeds_the_head():
    swin = {
        "name": "swin_s",
        "embed_dim": 16,
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 2, 2],
        "window_size": 4,
        "cluster_dim": 16,
    }
    cfg = build_config(
        {"model": {"backbone": swin, "head": {**TINY_HEAD, "encoder_layers": 1}, "num_classes": 5}}
    )
    model = build_model(cfg.model).train()
    out = model(images(1, 96, 160))
    assert set_masks(out).shape == (1, 8, 24, 40)
    assert [a.shape[-2:] for a in out["assignments"]] == [(24, 40), (12, 20), (6, 10)]


def test_backbone_parameters_are_under_backbone_prefix():
    for head in ({}, {"encoder_layers": 1}):
        model = tiny_model(head=head)
        names = [n for n, _ in model.named_parameters()]
        clustering = [n for n in names if n.endswith("scale")]
        assert clustering and all(n.startswith("backbone.") for n in clustering)
        # Only the head lives outside the backbone.
        outside = {n.split(".")[0] for n in names if not n.startswith("backbone.")}
        assert outside <= {"input_proj", "mask_proj", "decoder"}
        if head:
            assert any(n.startswith("backbone.encoder.") for n in names)


def test_gradients_reach_cluster_scales_through_decoding():
    model = tiny_model().train()
    out = model(images(1, 64, 64))
    # A loss on the final stride-4 masks only: s(i) gets gradients through eq. (5) decoding.
    (set_masks(out).sigmoid() * torch.linspace(-1, 1, 16)).sum().backward()
    for s in out["cluster_scales"]:
        assert s.grad is not None and s.grad.abs() > 0
    assert model.decoder.query_feat.weight.grad.abs().sum() > 0
    proj = [p for n, p in model.named_parameters() if n.endswith("fine_proj.weight")]
    assert len(proj) == 3 and all(p.grad.abs().sum() > 0 for p in proj)


def test_image_size_not_multiple_of_32_is_refused():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"100x160 is not a multiple of 32"):
        model(images(1, 100, 160))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        model(torch.zeros(1, 1, 64, 64))


def test_runs_under_the_flop_counter_and_fake_tensors():
    """The profile counts FLOPs with FlopCounterMode on fake inputs: the forward must not feed
    views of parameters made under no_grad to submodules (the counter's module tracker fails)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model().eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.zeros(1, 3, 64, 96)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model(x)
        assert out["pred_masks"].shape == (1, 8, 16, 24)
    assert counter.get_total_flops() > 0


def test_pixel_normalisation_uses_imagenet_statistics():
    model = tiny_model().eval()
    captured = {}
    model.backbone.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    with torch.no_grad():
        model(mean.expand(1, 3, 32, 32).clone())
    assert captured["x"].abs().max() < 1e-5
