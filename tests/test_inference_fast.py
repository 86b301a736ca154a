"""Inference fast paths (``hcformer.models.fuse``): the same outputs as the plain model.

Tolerance 1e-3 (relative L2 per output): float32 folding moves outputs by 1e-6-1e-5, except the
coarsest soft assignments (softmax of similarities / s(i) = 0.1: up to 3e-4); a wrong fold
moves them by O(1).

Every model family at the tiny scale (experiments/scales/tiny.yaml), with its BatchNorms given
random statistics and affines first (a random-init frozen BN is the identity, so folding it
would prove nothing). Which BNs follow a conv is found independently of the fuser, by running
the plain model once with hooks and recording each BN whose input tensor IS a conv's output.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from hcformer.analysis.profile import count_flops
from hcformer.commands._args import add_inference_arguments, inference_options
from hcformer.experiments import resolve
from hcformer.models import build_model
from hcformer.models.dcn import ModulatedDeformConv2d
from hcformer.models.frozen_bn import FrozenBatchNorm2d
from hcformer.models.fuse import (
    InferenceOptions,
    apply_options,
    fold_batchnorms,
    optimize_for_inference,
)

torch.set_num_threads(1)

MODELS = {
    "HCFormer R50 (DCNv2)": "coco_panoptic/hcformer-r50-L3-D8-Q100",
    "HCFormer+ R50": "coco_panoptic/hcformer-r50-L3-D8-Q100-plus",
    "MaskFormer R50": "coco_panoptic/maskformer-r50-D6-Q100-plus",
    "PSPNet": "ade20k/pspnet-r101-os8",
    "Deeplabv3": "ade20k/deeplabv3-r101-os8",
    "HC-PSPNet": "ade20k/pspnet-r101-L3",
    "HC-Deeplabv3": "ade20k/deeplabv3-r101-L3",
    "FPN": "cityscapes/fpn-r101-L0",
    "FCN-32s": "cityscapes/fcn32s-r101-L0",
    "HCFormer Swin-S": "coco_panoptic/hcformer-swins-L3-D8-Q100",
}
BN_TYPES = (FrozenBatchNorm2d, nn.BatchNorm2d)
CONV_TYPES = (nn.Conv2d, ModulatedDeformConv2d)


def tiny(exp_id: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(resolve(exp_id, "tiny").model).eval()
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, BN_TYPES):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.2)
        if isinstance(module, ModulatedDeformConv2d):  # non-zero offsets: real sampling
            with torch.no_grad():
                module.offset_mask.weight.normal_(0, 0.05, generator=g)
    return model


def images(b: int = 2, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(2)) * 255


def tensors(out, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    items = out.items() if isinstance(out, dict) else enumerate(out)
    flat = {}
    for key, value in items:
        flat.update(tensors(value, f"{prefix}/{key}"))
    return flat


def bns_fed_by_a_conv(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the BNs whose input is the output tensor of a conv, from one hooked forward."""
    conv_outputs: dict[int, torch.Tensor] = {}  # kept alive so ids are not reused
    fed: set[str] = set()
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, CONV_TYPES):
            hooks.append(
                module.register_forward_hook(lambda m, i, o: conv_outputs.__setitem__(id(o), o))
            )
        elif isinstance(module, BN_TYPES):

            def pre(m, inputs, name=name):
                if id(inputs[0]) in conv_outputs:
                    fed.add(name)

            hooks.append(module.register_forward_pre_hook(pre))
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return fed


def max_relative_error(ref: dict, out: dict) -> float:
    assert ref.keys() == out.keys()
    errors = [0.0]
    for key, a in ref.items():
        b = out[key]
        assert b.shape == a.shape and b.dtype == a.dtype, key
        if a.is_floating_point():
            errors.append(((a - b).norm() / a.norm().clamp_min(1e-12)).item())
        else:
            assert torch.equal(a, b), key
    return max(errors)


@pytest.mark.parametrize("label", list(MODELS))
def test_folding_keeps_outputs_and_removes_every_bn_after_a_conv(label):
    model = tiny(MODELS[label])
    x = images()
    fed = bns_fed_by_a_conv(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        ref = tensors(model(x))
        fused = optimize_for_inference(model, fuse=True)
        out = tensors(fused(x))
    assert max_relative_error(ref, out) < 1e-3
    # Exactly the BNs fed by a conv are gone (a BN fed by anything else would be kept).
    left = {n for n, m in fused.named_modules() if isinstance(m, BN_TYPES)}
    before = {n for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    assert before - left == fed
    if label.startswith(("HCFormer Swin", "HCFormer+", "HCFormer R50", "MaskFormer")):
        frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert len(fed) == len(frozen) or label.startswith("HCFormer Swin")
    # The original is untouched: a copy was fused.
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_per_pixel_heads_and_dcns_are_folded_too():
    model = tiny(MODELS["HC-PSPNet"])
    n_head_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.head.modules())
    dcn_bns = 6  # three clustered stages x (3x3 DCN + shortcut DCN), each followed by a BN
    assert sum(isinstance(m, ModulatedDeformConv2d) for m in model.modules()) == dcn_bns
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    fused = optimize_for_inference(model, fuse=True)
    assert n_head_bn == 5  # 4 pyramid branches + the bottleneck
    assert not any(isinstance(m, BN_TYPES) for m in fused.modules())
    assert fold_batchnorms(tiny(MODELS["HC-PSPNet"])) == n_head_bn + n_frozen
    first = fused.backbone.layer2[0]
    assert isinstance(first.conv2, ModulatedDeformConv2d) and isinstance(first.bn2, nn.Identity)


@pytest.mark.parametrize("label", ["HCFormer R50 (DCNv2)", "MaskFormer R50", "HC-PSPNet"])
def test_channels_last_and_bfloat16(label):
    model = tiny(MODELS[label])
    x = images()
    with torch.inference_mode():
        ref = tensors(model(x))
        cl = tensors(optimize_for_inference(model, fuse=True, channels_last=True)(x))
        bf16 = tensors(optimize_for_inference(model, fuse=True, dtype="bfloat16")(x))
    assert max_relative_error(ref, cl) < 1e-3
    # bfloat16 keeps 8 bits of mantissa; outputs come back in float32. At random init the
    # coarsest assignments move up to ~40% (a softmax over similarities / s(i) = 0.1), the
    # logits 10-30%: the accuracy of bf16 is measured by ``hcformer evaluate --dtype``.
    assert all(t.dtype == ref[k].dtype and t.detach().isfinite().all() for k, t in bf16.items())
    assert 1e-4 < max_relative_error(ref, bf16) < 0.6


def test_plain_options_return_the_model_itself():
    model = tiny(MODELS["FCN-32s"]).train()
    assert optimize_for_inference(model, fuse=False) is model
    assert model.training  # not even put in eval mode unless inplace
    assert apply_options(model, InferenceOptions()) is model
    assert InferenceOptions().plain and not InferenceOptions(fuse=True).plain


def test_parameter_counts_of_profile_count_the_unfused_model():
    cfg = resolve(MODELS["HC-PSPNet"], "tiny")
    model = tiny(MODELS["HC-PSPNet"])
    params = sum(p.numel() for p in model.parameters())
    fused = optimize_for_inference(model, fuse=True)
    # Folding gives bias-free convs a bias: the fused copy has more parameters ...
    assert sum(p.numel() for p in fused.parameters()) > params
    # ... while the model and the profile's count are those of the plain model.
    assert sum(p.numel() for p in model.parameters()) == params
    assert count_flops(cfg, sizes=None)["params_m"] == pytest.approx(params / 1e6)


def test_command_line_flags_and_bad_values():
    parser = argparse.ArgumentParser()
    add_inference_arguments(parser)
    opts = inference_options(parser.parse_args([]))
    assert opts == InferenceOptions()
    opts = inference_options(
        parser.parse_args(["--fuse", "--channels-last", "--dtype", "bfloat16", "--compile"])
    )
    assert opts == InferenceOptions(
        fuse=True, channels_last=True, dtype="bfloat16", compile="default"
    )
    args = parser.parse_args(["--compile", "reduce-overhead", "--cuda-graph"])
    assert inference_options(args).compile == "reduce-overhead"
    assert inference_options(args).cuda_graph
    with pytest.raises(ValueError, match="dtype: 'int8'"):
        optimize_for_inference(nn.Conv2d(1, 1, 1), dtype="int8")
    with pytest.raises(ValueError, match="compile: 'fast'"):
        optimize_for_inference(nn.Conv2d(1, 1, 1), compile="fast")


def test_cuda_graph_runner_refuses_cpu_inputs():
    from hcformer.models.fuse import CUDAGraphRunner

    with pytest.raises(RuntimeError, match="needs CUDA inputs"):
        CUDAGraphRunner(nn.Conv2d(3, 3, 1))(torch.zeros(1, 3, 4, 4))


@pytest.mark.slow
def test_hcformer_evaluate_with_the_fast_paths_scores_as_the_plain_model(tmp_path, monkeypatch):
    """``hcformer evaluate --fuse --channels-last`` on a run folder (random weights, tiny
    synthetic ADE20K): the same metrics as the plain evaluation, which loads the weights as
    saved (the fused copy is the evaluator's own)."""
    import yaml

    from hcformer.commands.evaluate import main as evaluate_main
    from hcformer.config import merge, to_dict

    cfg = resolve("ade20k/hcformer-r50-L3-D8-Q100", "tiny")
    run = tmp_path / "run"
    run.mkdir()
    data = {
        "root": str(tmp_path / "ade20k"),
        "synthetic": {"train_images": 2, "val_images": 3, "size": [64, 64], "seed": 0},
        "test_short": 64,
        "test_max": 64,
    }
    overrides = {"data": data, "tracking": {"enabled": False}, "test": {"visual_images": 0}}
    (run / "config.yaml").write_text(yaml.safe_dump(merge(to_dict(cfg), overrides)))
    model = tiny("ade20k/hcformer-r50-L3-D8-Q100")
    torch.save(model.state_dict(), run / "model_final.pt")
    from hcformer.models import fuse

    folded = []
    monkeypatch.setattr(fuse, "fold_batchnorms", lambda m: folded.append(fold_batchnorms(m)))
    metrics = {}
    for name, flags in (("plain", []), ("fast", ["--fuse", "--channels-last"])):
        assert evaluate_main(["--run-dir", str(run), "--device", "cpu", *flags]) == 0
        metrics[name] = json.loads((run / "metrics.json").read_text())
        assert len(folded) == (name == "fast")  # the plain evaluation folds nothing
    assert folded[0] == sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    for key in ("miou", "pixel_acc", "useg_level1", "useg_level2", "useg_level3"):
        assert metrics["fast"][key] == pytest.approx(metrics["plain"][key], abs=0.05), key


def test_the_fast_path_compiles_as_one_graph():
    """Folding, channels-last and autocast add no graph break (dynamo's trace only)."""
    model = tiny(MODELS["HCFormer R50 (DCNv2)"])
    fast = optimize_for_inference(model, fuse=True, channels_last=True, dtype="bfloat16")
    with torch.inference_mode():
        explained = torch._dynamo.explain(fast)(images(1))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
