"""Backbones with clustering modules: shapes, taps, DCNv2, frozen BN, Swin windows, checkpoints,
and parameter counts against timm's own models."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from hcformer.config import BackboneConfig, build_config
from hcformer.errors import ConfigError, HCFormerError
from hcformer.models.backbones import build_backbone
from hcformer.models.backbones.swin import PaddedWindowBlock
from hcformer.models.clustering import ClusteringModule
from hcformer.models.dcn import ModulatedDeformConv2d
from hcformer.models.frozen_bn import FrozenBatchNorm2d

TINY_RESNET = {"depths": [1, 2, 1, 1], "widths": [8, 16, 32, 64], "stem_width": 8}
TINY_SWIN = {"depths": [1, 1, 2, 1], "embed_dim": 16, "num_heads": [1, 2, 4, 8], "window_size": 7}


def tiny(name: str, **kw) -> BackboneConfig:
    shape = TINY_RESNET if name.startswith("resnet") else TINY_SWIN
    return BackboneConfig(name=name, **{**shape, **kw})


def n_params(module: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for k, p in module.named_parameters() if k.startswith(prefix))


# --------------------------------------------------------------------------------------------
# Shapes, channels, strides and the clustering taps.


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "swin_s", "swin_l"])
@pytest.mark.parametrize("size", [(96, 160), (64, 224)])
def test_features_and_assignments_for_every_level(name, size):
    torch.manual_seed(0)
    h, w = size
    x = torch.randn(2, 3, h, w)
    for level in range(4):
        bb = build_backbone(tiny(name, hierarchy_level=level)).eval()
        with torch.no_grad():
            out = bb(x)
        assert list(out.features) == ["res2", "res3", "res4", "res5"]
        assert bb.strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
        for key, feat in out.features.items():
            s = bb.strides[key]
            assert feat.shape == (2, bb.out_channels[key], h // s, w // s), key
        if name.startswith("resnet"):
            assert bb.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
        else:
            assert bb.out_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
        # The modules sit at the LAST `level` downsamplings: fine maps at strides 16, 8, 4.
        fine_strides = [4, 8, 16][3 - level :]
        assert [a.shape for a in out.assignments] == [(2, 9, h // s, w // s) for s in fine_strides]
        for a in out.assignments:
            torch.testing.assert_close(a.sum(1), torch.ones_like(a[:, 0]))
        modules = list(bb.clustering.values())
        assert len(out.cluster_scales) == level == len(modules)
        for scale, module in zip(out.cluster_scales, modules):
            assert isinstance(module, ClusteringModule)
            assert scale is module.scale and scale.requires_grad
            assert scale.item() == pytest.approx(0.1)


def test_resnet_taps_are_the_previous_stage_and_the_whole_first_block():
    """The coarse input of a module is the first bottleneck's output (after the residual add
    and ReLU), the fine input the previous stage's output (implementation notes)."""
    torch.manual_seed(0)
    bb = build_backbone(tiny("resnet50", hierarchy_level=3)).eval()
    seen = {}
    for name, module in bb.clustering.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: args}))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = bb(x)
        stem = bb.maxpool(bb.act1(bb.bn1(bb.conv1(x))))
        res2 = bb.layer1(stem)
        first3 = bb.layer2[0](res2)
        res3 = bb.layer2[1](first3)
    torch.testing.assert_close(seen["layer2"][0], out.features["res2"])
    torch.testing.assert_close(seen["layer2"][0], res2)
    torch.testing.assert_close(seen["layer2"][1], first3)
    assert (first3 >= 0).all()  # after the block's ReLU
    torch.testing.assert_close(out.features["res3"], res3)
    torch.testing.assert_close(seen["layer3"][0], out.features["res3"])
    torch.testing.assert_close(seen["layer4"][0], out.features["res4"])


def test_swin_taps_are_the_raw_stage_output_and_the_patch_merging():
    torch.manual_seed(0)
    bb = build_backbone(tiny("swin_s", hierarchy_level=3)).eval()
    seen = {}
    for name, module in bb.clustering.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: args}))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = bb(x)
        s0 = bb.layers[0](bb.patch_embed(x))
        merged = bb.layers[1].downsample(s0)
    assert sorted(bb.clustering) == ["stage1", "stage2", "stage3"]
    torch.testing.assert_close(seen["stage1"][0], s0.permute(0, 3, 1, 2))
    torch.testing.assert_close(out.features["res2"], s0.permute(0, 3, 1, 2))  # not normed
    torch.testing.assert_close(seen["stage1"][1], merged.permute(0, 3, 1, 2))
    assert merged.shape[-1] == 32  # Linear(4C, 2C)
    # Only res5 is normed (norm3), and the module sees the stage output before that norm.
    assert hasattr(bb, "norm3") and not hasattr(bb, "norm0")
    raw5 = seen["stage3"][1]
    with torch.no_grad():
        last = bb.layers[3].blocks(raw5.permute(0, 2, 3, 1))
        torch.testing.assert_close(out.features["res5"], bb.norm3(last).permute(0, 3, 1, 2))


def test_swin_norm_all_features_norms_every_output():
    cfg = tiny("swin_s", hierarchy_level=0)
    bb = build_backbone(cfg, norm_all_features=True).eval()
    assert all(isinstance(getattr(bb, f"norm{i}"), nn.LayerNorm) for i in range(4))
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 64)).features
    mean = feats["res2"].mean(1)  # LayerNorm with default affine: zero mean over channels
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["resnet50", "swin_s"])
def test_every_trainable_parameter_gets_a_gradient(name):
    """No unused parameters (DDP without find_unused_parameters): res5 and the assignments
    reach every trainable parameter."""
    torch.manual_seed(0)
    bb = build_backbone(tiny(name, hierarchy_level=3)).train()
    out = bb(torch.randn(2, 3, 64, 64))
    loss = out.features["res5"].square().mean() + sum(a.square().mean() for a in out.assignments)
    loss.backward()
    trainable = {k: p for k, p in bb.named_parameters() if p.requires_grad}
    no_grad = [k for k, p in trainable.items() if p.grad is None]
    assert not no_grad
    assert all(s.grad is not None and s.grad.abs() > 0 for s in out.cluster_scales)


@pytest.mark.parametrize("name", ["resnet50", "swin_s"])
def test_shape_only_forward_on_the_meta_device(name):
    """FLOP counting runs the backbone on shapes only (the DCN included)."""
    with torch.device("meta"):
        bb = build_backbone(tiny(name, hierarchy_level=3)).eval()
        out = bb(torch.empty(1, 3, 96, 64))
    assert out.features["res5"].shape == (1, bb.out_channels["res5"], 3, 2)
    assert [a.shape for a in out.assignments] == [(1, 9, 24, 16), (1, 9, 12, 8), (1, 9, 6, 4)]


def test_bad_input_sizes_are_rejected():
    bb = build_backbone(tiny("resnet50"))
    with pytest.raises(ValueError, match="multiples of 32.*80x100"):
        bb(torch.randn(1, 3, 80, 100))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        bb(torch.randn(1, 1, 64, 64))


# --------------------------------------------------------------------------------------------
# DCNv2 and dilation.


def _dcn_stages(bb: nn.Module) -> dict[str, tuple[bool, bool]]:
    return {
        name: (
            isinstance(getattr(bb, name)[0].conv2, ModulatedDeformConv2d),
            isinstance(getattr(bb, name)[0].downsample[0], ModulatedDeformConv2d),
        )
        for name in ("layer2", "layer3", "layer4")
    }


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_dcn_only_at_the_clustered_downsamplings(level):
    bb = build_backbone(tiny("resnet50", hierarchy_level=level, dcnv2=True))
    clustered = ["layer2", "layer3", "layer4"][3 - level :]
    assert _dcn_stages(bb) == {
        name: (name in clustered, name in clustered) for name in ("layer2", "layer3", "layer4")
    }
    dcns = [m for m in bb.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(dcns) == 2 * level
    for m in dcns:
        assert m.stride == 2
        assert m.offset_mask.out_channels == 3 * m.kernel_size**2
        assert (m.kernel_size, m.padding) in ((3, 1), (1, 0))
    off = build_backbone(tiny("resnet50", hierarchy_level=level, dcnv2=False))
    assert not any(isinstance(m, ModulatedDeformConv2d) for m in off.modules())
    for name in ("layer2", "layer3", "layer4"):  # torchvision-style: the stride is in the 3x3
        first = getattr(off, name)[0]
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
        assert first.downsample[0].stride == (2, 2)


@pytest.mark.parametrize(("k", "pad"), [(3, 1), (1, 0)])
def test_dcn_at_init_is_half_the_plain_conv(k, pad):
    """Zero offsets, mask sigmoid(0) = 0.5 and bias 0: DCN(x) = 0.5 * conv(x) (independent
    reference: F.conv2d with the copied weight)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, k, stride=2, padding=pad, bias=False)
    dcn = ModulatedDeformConv2d.from_conv(conv)
    assert torch.equal(dcn.weight, conv.weight)
    assert (
        not dcn.bias.any() and not dcn.offset_mask.weight.any() and not dcn.offset_mask.bias.any()
    )
    x = torch.randn(2, 6, 12, 18)
    expected = 0.5 * F.conv2d(x, conv.weight, stride=2, padding=pad)
    torch.testing.assert_close(dcn(x), expected, rtol=1e-5, atol=1e-5)
    # Computed in fp32 under autocast (then handed on in the input's precision): equal to the
    # fp32 result rounded once, not to a bf16 computation.
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dcn(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, dcn(xb.float()).bfloat16(), rtol=0, atol=0)


def test_dcn_offsets_move_the_sampling_points():
    """A constant offset of +1 column with mask 1 samples the input one column to the right:
    equals a plain conv of the shifted input (checks the [o1 | o2 | mask] layout fed to
    torchvision's (dy, dx) pairs)."""
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(in_channels=4, out_channels=3, kernel_size=3, stride=2, padding=1)
    kk = 9
    with torch.no_grad():
        bias = torch.zeros(3 * kk)
        bias[1 : 2 * kk : 2] = 1.0  # dx of every kernel tap
        bias[2 * kk :] = 30.0  # mask = sigmoid(30) = 1
        dcn.offset_mask.bias.copy_(bias)
        dcn.bias.normal_()
    x = torch.randn(1, 4, 10, 14)
    # Tap (ky, kx) of output (oy, ox) reads x[2oy - 1 + ky, 2ox - 1 + kx + 1], zero outside:
    # a plain conv over x padded by 1 row top and bottom and 2 columns on the right only.
    shifted = F.pad(x, (0, 2, 1, 1))
    expected = F.conv2d(shifted, dcn.weight, dcn.bias, stride=2)
    torch.testing.assert_close(dcn(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "k", "stride", "pad", "dilation"),
    [
        ((2, 3, 7, 9), 3, 2, 1, 1),
        ((2, 3, 7, 9), 1, 2, 0, 1),
        ((1, 2, 5, 1), 3, 1, 1, 1),
        ((2, 4, 11, 8), 3, 1, 2, 2),
    ],
)
@pytest.mark.parametrize("contract", ["contract_taps", "contract_taps_tf32"])
def test_cpu_deform_conv_equals_torchvision(shape, k, stride, pad, dilation, contract):
    """The grid_sample formulation used on CPUs (and, with the TF32 product, for training on
    GPUs) equals ``torchvision.ops.deform_conv2d`` in float64, values and all five gradients,
    with offsets large enough to leave the image."""
    from torchvision.ops import deform_conv2d

    from hcformer.models import dcn

    def sampled_deform_conv2d(*args, **kwargs):
        return dcn.sampled_deform_conv2d(*args, **kwargs, contract=getattr(dcn, contract))

    g = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    h_out = (h + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * pad - dilation * (k - 1) - 1) // stride + 1

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float64) * scale).requires_grad_()

    x, weight, bias = rand(b, c, h, w), rand(5, c, k, k), rand(5)
    offset = rand(b, 2 * k * k, h_out, w_out, scale=3.0)
    mask = torch.rand(b, k * k, h_out, w_out, generator=g, dtype=torch.float64).requires_grad_()
    kwargs = {"stride": stride, "padding": pad, "dilation": dilation, "mask": mask}
    ours = sampled_deform_conv2d(x, offset, weight, bias, **kwargs)
    ref = deform_conv2d(x, offset, weight, bias, **kwargs)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    inputs = [x, offset, weight, bias, mask]
    for a, r in zip(
        torch.autograd.grad(ours, inputs, upstream),
        torch.autograd.grad(ref, inputs, upstream),
        strict=True,
    ):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_output_stride_8_dilates_layer3_and_layer4():
    cfg = tiny("resnet50", hierarchy_level=0, output_stride=8, depths=[1, 1, 2, 2])
    bb = build_backbone(cfg).eval()
    assert bb.strides == {"res2": 4, "res3": 8, "res4": 8, "res5": 8}
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 96))
    assert out.features["res4"].shape[-2:] == (8, 12) == out.features["res5"].shape[-2:]
    assert out.assignments == [] and out.cluster_scales == []
    # torchvision's replace_stride_with_dilation: a stage's first block keeps the previous
    # dilation, the others take the stage's (2 for layer3, 4 for layer4); nothing strides.
    conv2 = {n: [b.conv2 for b in getattr(bb, n)] for n in ("layer3", "layer4")}
    assert [c.dilation[0] for c in conv2["layer3"] + conv2["layer4"]] == [1, 2, 2, 4]
    assert all(c.stride == (1, 1) for c in conv2["layer3"] + conv2["layer4"])
    with pytest.raises(ConfigError, match="output_stride.*hierarchy_level 0, got 3"):
        build_backbone(tiny("resnet50", hierarchy_level=3, output_stride=8))
    with pytest.raises(ConfigError, match="ResNets only"):
        build_backbone(tiny("swin_s", hierarchy_level=0, output_stride=8))


# --------------------------------------------------------------------------------------------
# Frozen BatchNorm.


def test_random_init_keeps_the_activation_scale():
    """Random init is He fan_in: with frozen (identity) BN nothing else holds the scale, and
    timm's fan_out init shrank it about 2x per stage (res5 0.04 std at the tiny scale)."""
    torch.manual_seed(0)
    bb = build_backbone(tiny("resnet50", hierarchy_level=3))
    for name, m in bb.named_modules():
        trunk_conv = not name.startswith("clustering") and not name.endswith("offset_mask")
        if isinstance(m, nn.Conv2d) and trunk_conv:
            fan_in = m.weight[0].numel()
            assert m.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.25), name
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, 128, 128)).features
    stds = [feats[k].std().item() for k in ("res2", "res3", "res4", "res5")]
    assert min(stds) > 0.25, stds  # fan_out: 0.68 / 0.34 / 0.17 / 0.085


def test_pretrained_trunk_keeps_its_weights_and_a_narrowed_stem_is_fan_in(monkeypatch):
    """Under timm's pretrained weights only the convs a narrowed stem adds are initialised."""
    created = {}
    real = timm.create_model

    def fake(name, pretrained=False, **kw):  # timm's model, as if its weights were loaded
        model = real(name, pretrained=False, **kw)
        created.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(timm, "create_model", fake)
    bb = build_backbone(tiny("resnet50", pretrained="timm:resnet50.tv_in1k", hierarchy_level=0))
    state = bb.state_dict()
    pretrained_parts = ("layer1.0.conv2.", "layer1.0.conv3.", "layer2.", "layer3.", "layer4.")
    kept = [k for k in state if k.startswith(pretrained_parts)]
    assert kept and all(torch.equal(state[k], created[k]) for k in kept)
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight"):
        fan_in = state[name][0].numel()
        assert state[name].std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.25), name


def test_batchnorm_is_frozen():
    torch.manual_seed(0)
    bb = build_backbone(tiny("resnet50", hierarchy_level=3))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bb.modules())
    bns = [m for m in bb.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(bns) == 3 * (1 + 2 + 1 + 1) + 1 + 4  # 3 per block, stem, 4 shortcut projections
    buffers = {k for k, _ in bb.named_buffers()}
    params = {k for k, _ in bb.named_parameters()}
    for name, m in bb.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            keys = {f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
            assert keys <= buffers and not keys & params
            with torch.no_grad():  # non-trivial statistics and affine
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    bb.train()
    train_out = bb(x).features["res5"]
    bb.eval()
    eval_out = bb(x).features["res5"]
    torch.testing.assert_close(train_out, eval_out)
    # Against torch's BatchNorm2d in eval mode with the same statistics and affine.
    ref = nn.BatchNorm2d(bns[0].num_features).eval()
    ref.load_state_dict(bns[0].state_dict(), strict=False)
    y = torch.randn(2, bns[0].num_features, 5, 7)
    torch.testing.assert_close(bns[0](y), ref(y))


# --------------------------------------------------------------------------------------------
# Swin windows on maps that the window does not divide.


def _swin_block(window: int, shift: int) -> PaddedWindowBlock:
    block = SwinTransformerBlock(
        dim=8,
        input_resolution=(64, 64),
        num_heads=2,
        window_size=window,
        shift_size=shift,
        always_partition=True,
        dynamic_mask=True,
    )
    block.__class__ = PaddedWindowBlock
    return block.eval()


def _expected_neighbours(h, w, window, shift, p):
    """Tokens that token p = (i, j) may attend to under Mask2Former's scheme: pad the map to a
    multiple of the window, roll it by -shift, and attend within a window and within the same
    region of the shift mask (three bands per axis of the padded, rolled map)."""
    hp, wp = -(-h // window) * window, -(-w // window) * window

    def place(i, n_pad):
        r = (i - shift) % n_pad  # position after the roll
        band = 0 if r < n_pad - window else (1 if r < n_pad - shift else 2)
        return r // window, band if shift else 0

    pi, pj = place(p[0], hp), place(p[1], wp)
    return {(i, j) for i in range(h) for j in range(w) if place(i, hp) == pi and place(j, wp) == pj}


def _attended(block: nn.Module, x: torch.Tensor, p: tuple[int, int]) -> set[tuple[int, int]]:
    """Output tokens that change when token p changes (one channel: LayerNorm would undo a
    constant added to all channels)."""
    moved = x.clone()
    moved[0, p[0], p[1], 1] += 1.0
    with torch.no_grad():
        changed = (block(moved) - block(x)).abs().amax(-1)[0] > 1e-6
    return {(int(i), int(j)) for i, j in changed.nonzero()}


@pytest.mark.parametrize(("h", "w", "shift"), [(6, 10, 2), (6, 10, 0), (9, 5, 2), (8, 8, 2)])
def test_swin_windows_pad_before_the_shift(h, w, shift):
    torch.manual_seed(0)
    window = 4
    block = _swin_block(window, shift)
    x = torch.randn(1, h, w, 8)
    x[..., 0] += 3.0
    for p in [(0, 0), (h - 1, w - 1), (h // 2, 1), (1, w - 2)]:
        assert _attended(block, x, p) == _expected_neighbours(h, w, window, shift, p), p


def test_timm_alone_shifts_before_padding():
    """Why PaddedWindowBlock exists: on a 9-row map timm's own block groups tokens differently."""
    torch.manual_seed(0)
    block = _swin_block(4, 2)
    block.__class__ = SwinTransformerBlock
    x = torch.randn(1, 9, 5, 8)
    assert any(
        _attended(block, x, p) != _expected_neighbours(9, 5, 4, 2, p)
        for p in [(0, 0), (8, 4), (4, 1), (1, 3)]
    )


def test_swin_any_size_divisible_by_32_and_drop_path_from_config():
    cfg = tiny("swin_l", hierarchy_level=2, window_size=12, drop_path=0.3)
    bb = build_backbone(cfg)
    blocks = [m for m in bb.modules() if isinstance(m, SwinTransformerBlock)]
    assert blocks and all(type(b) is PaddedWindowBlock for b in blocks)
    assert all(b.window_size == (12, 12) for b in blocks)  # never shrunk to the map
    rates = [b.drop_path1.drop_prob for b in blocks if hasattr(b.drop_path1, "drop_prob")]
    assert rates[-1] == pytest.approx(0.3)
    with torch.no_grad():
        out = bb.eval()(torch.randn(1, 3, 32, 416))
    assert out.features["res5"].shape == (1, 128, 1, 13)


# --------------------------------------------------------------------------------------------
# Pretrained checkpoints.


def _timm_resnet_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet checkpoint of the tiny shape (plain BN, fc, 64-ch stem)."""
    torch.manual_seed(seed)
    ref = timm.create_model("resnet50", layers=(1, 2, 1, 1), channels=(8, 16, 32, 64))
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    return ref.state_dict()


def _resnet_cfg(path, **kw):
    shape = {"depths": [1, 2, 1, 1], "widths": [8, 16, 32, 64], **kw}
    return BackboneConfig(name="resnet50", pretrained=str(path), **shape)


def _to_detectron2(key: str) -> str:
    key = re.sub(r"^conv1\.", "stem.conv1.", key)
    key = re.sub(r"^bn1\.", "stem.conv1.norm.", key)
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\.downsample\.0\.", ".shortcut.", key)
    key = re.sub(r"\.downsample\.1\.", ".shortcut.norm.", key)
    key = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", key)
    return "backbone." + key


@pytest.mark.parametrize("layout", ["torchvision", "detectron2"])
def test_resnet_loads_a_local_checkpoint(tmp_path, layout):
    state = _timm_resnet_state()
    path = tmp_path / "r50.pth"
    if layout == "torchvision":
        torch.save(state, path)
    else:
        torch.save({"model": {_to_detectron2(k): v for k, v in state.items()}, "iter": 0}, path)
    bb = build_backbone(_resnet_cfg(path, hierarchy_level=2, dcnv2=True))
    own = bb.state_dict()
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(own[key], value), key
    # The DCN took the pretrained conv weights; its offsets and bias are new (zero).
    assert isinstance(bb.layer3[0].conv2, ModulatedDeformConv2d)
    assert torch.equal(bb.layer3[0].conv2.weight, state["layer3.0.conv2.weight"])
    assert torch.equal(bb.layer3[0].downsample[0].weight, state["layer3.0.downsample.0.weight"])
    assert not bb.layer3[0].conv2.offset_mask.weight.any()


def test_unreadable_or_mismatched_checkpoints_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(HCFormerError, match=r"corrupt\.pth: cannot read pretrained weights"):
        build_backbone(_resnet_cfg(corrupt))
    with pytest.raises(HCFormerError, match=r"missing\.pth: pretrained weights file not found"):
        build_backbone(_resnet_cfg(tmp_path / "missing.pth"))
    other = tmp_path / "other.pth"  # a checkpoint of another architecture (deeper layer2)
    torch.save(
        timm.create_model("resnet50", layers=(1, 3, 1, 1), channels=(8, 16, 32, 64)).state_dict(),
        other,
    )
    with pytest.raises(
        HCFormerError, match=r"other\.pth: not a checkpoint .* unknown .*layer2\.2\."
    ):
        build_backbone(_resnet_cfg(other))
    wide = tmp_path / "wide.pth"
    torch.save(timm.create_model("resnet50", layers=(1, 2, 1, 1)).state_dict(), wide)
    with pytest.raises(HCFormerError, match=r"wide\.pth: \d+ tensors have the wrong shape"):
        build_backbone(_resnet_cfg(wide))


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_swin_loads_a_local_checkpoint(tmp_path, layout):
    torch.manual_seed(2)
    ref = timm.create_model(
        "swin_small_patch4_window7_224", embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)
    )
    state = ref.state_dict()
    saved = dict(state)
    if layout == "original":  # Microsoft / Mask2Former layout: patch merging ends a stage
        saved = {
            re.sub(
                r"^layers\.(\d)\.downsample",
                lambda m: f"layers.{int(m.group(1)) - 1}.downsample",
                k,
            ): v
            for k, v in state.items()
        }
        for i in range(4):  # buffers the release stores and timm drops
            saved[f"layers.{i}.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49).long()
        saved["layers.2.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
        saved = {f"backbone.{k}": v for k, v in saved.items()}
    path = tmp_path / "swin.pth"
    torch.save({"model": saved}, path)
    bb = build_backbone(tiny("swin_s", hierarchy_level=3, pretrained=str(path)))
    own = bb.state_dict()
    loaded = [k for k in state if k in own]
    assert len(loaded) > 20
    for key in loaded:
        assert torch.equal(own[key], state[key]), key
    # As Mask2Former: the classifier's final norm is not the stride-32 output norm.
    assert torch.equal(bb.norm3.weight, torch.ones(128))
    assert bb.no_weight_decay() == {
        k for k in dict(bb.named_parameters()) if k.endswith("relative_position_bias_table")
    }
    assert len(bb.no_weight_decay()) == 5  # one per block


def test_timm_prefix_asks_timm_for_pretrained_weights(monkeypatch):
    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        calls.append((name, pretrained))
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake)
    build_backbone(tiny("resnet50", pretrained="timm:resnet50.tv_in1k"))
    build_backbone(tiny("swin_s", pretrained="timm:swin_small_patch4_window7_224.ms_in1k"))
    assert calls == [
        ("resnet50.tv_in1k", True),
        ("swin_small_patch4_window7_224.ms_in1k", True),
    ]
    with pytest.raises(HCFormerError, match="model.backbone.pretrained: 'timm:no_such_net'"):
        build_backbone(tiny("resnet50", pretrained="timm:no_such_net"))


# --------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hierarchy_level": 4}, "hierarchy_level: expected 0..3"),
        ({"output_stride": 16}, "output_stride: expected 8 or 32"),
        ({"depths": [1, 1, 1]}, "depths: expected 4 positive integers"),
        ({"embed_dim": 32}, "embed_dim: applies to Swin backbones only"),
        ({"name": "swin_s", "widths": [8, 8, 8, 8]}, "widths: applies to ResNet backbones only"),
        ({"name": "swin_s", "num_heads": [5, 2, 4, 8]}, "num_heads: stage 0 has 96 channels"),
    ],
)
def test_bad_backbone_configs_name_the_key(overrides, message):
    cfg = build_config({"model": {"backbone": overrides}}).model.backbone
    with pytest.raises(ConfigError, match=message):
        build_backbone(cfg)


# --------------------------------------------------------------------------------------------
# Parameter counts (the paper counts trainable + frozen parameters; frozen BN is all buffers, as
# detectron2's: see hcformer/models/frozen_bn.py for why the hand counts of the notes need it).


def _cluster_params(fine: int, coarse: int, dim: int = 128) -> int:
    """LayerNorm(C) x2 each side, 1x1 convs without bias to C_F, and s."""
    return 2 * fine + 2 * coarse + dim * (fine + coarse) + 1


def _dcn_params(block_in: int, width: int, out: int) -> int:
    """Offset convs (3x3, bias) for the 3x3 (27 outputs) and the 1x1 shortcut (3 outputs) DCN,
    and the two new DCN biases."""
    return (width * 9 * 27 + 27) + (block_in * 9 * 3 + 3) + width + out


@pytest.mark.parametrize(
    ("name", "timm_name", "millions"),
    [
        ("resnet50", "resnet50", 23.5),
        ("resnet101", "resnet101", 42.4),  # 42.5M with the BN affine
        ("swin_s", "swin_small_patch4_window7_224", 48.8),
        ("swin_l", "swin_large_patch4_window12_384", 195.2),
    ],
)
def test_parameter_counts_match_timm(name, timm_name, millions):
    with torch.device("meta"):
        ref = timm.create_model(timm_name, num_classes=0)
        plain = build_backbone(BackboneConfig(name=name, hierarchy_level=0))
        full = build_backbone(BackboneConfig(name=name, hierarchy_level=3, dcnv2=True))
    bn_affine = sum(
        n_params(m) for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    assert bn_affine == {"resnet50": 53_120, "resnet101": 105_344}.get(name, 0)
    assert n_params(plain) == n_params(ref) - bn_affine
    assert round(n_params(plain) / 1e6, 1) == pytest.approx(millions)
    if name.startswith("resnet"):
        stages = [(256, 512, 128), (512, 1024, 256), (1024, 2048, 512)]  # fine, coarse, width
        clustering = sum(_cluster_params(f, c) for f, c, _ in stages)
        dcn = sum(_dcn_params(f, w, c) for f, c, w in stages)
        assert clustering == 698_883 and dcn == 270_682
    else:
        c = 96 if name == "swin_s" else 192
        clustering = sum(_cluster_params(c * 2**i, c * 2 ** (i + 1)) for i in range(3))
        dcn = 0  # no DCN in Swin
    assert n_params(full, "clustering.") == clustering
    assert n_params(full) == n_params(plain) + clustering + dcn
    assert any(isinstance(m, ModulatedDeformConv2d) for m in full.modules()) == bool(dcn)


def test_dcn_implementation_by_device_and_mode():
    """CPU: the sampled form; meta (FLOP counting): torchvision's op, which counters know."""
    from torchvision.ops import deform_conv2d

    from hcformer.models import dcn

    layer = dcn.ModulatedDeformConv2d(in_channels=4, out_channels=4, kernel_size=3, padding=1)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    assert dcn._sampler(x, layer.weight) is dcn.sampled_deform_conv2d
    meta = x.detach().to("meta")
    assert dcn._sampler(meta, layer.weight.to("meta")) is deform_conv2d
    if torch.cuda.is_available():  # training on a GPU: the sampled form with TF32 products
        cuda = layer.cuda()
        chosen = dcn._sampler(x.cuda(), cuda.weight)
        assert chosen.keywords == {"contract": dcn.contract_taps_tf32}
        with torch.no_grad():
            assert dcn._sampler(x.cuda(), cuda.weight) is deform_conv2d


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-pass form runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_frozen_batchnorm_on_cuda_equals_the_cpu_form(dtype):
    g = torch.Generator().manual_seed(0)
    bn = FrozenBatchNorm2d(8)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(8, generator=g))
    bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    x = torch.randn(2, 8, 5, 7, generator=g)
    expected = bn(x)
    got = bn.cuda()(x.cuda().to(dtype)).float().cpu()
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(got, expected, **tol)
