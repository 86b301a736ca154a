"""ClusteringModule (Sec. 2.2, eq. 3) and decode_masks (Sec. 2.3, eq. 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hcformer import ops
from hcformer.models.clustering import BASIS_DECODE_MAX_CELLS, ClusteringModule, decode_masks
from hcformer.ops import reference


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _module(**kw) -> ClusteringModule:
    torch.manual_seed(0)
    args = dict(fine_channels=12, coarse_channels=20, cluster_dim=8)
    return ClusteringModule(**{**args, **kw})


def test_structure_and_init():
    m = ClusteringModule(fine_channels=256, coarse_channels=512)
    assert m.fine_proj.weight.shape == (128, 256, 1, 1) and m.fine_proj.bias is None
    assert m.coarse_proj.weight.shape == (128, 512, 1, 1) and m.coarse_proj.bias is None
    assert m.fine_norm.normalized_shape == (256,) and m.coarse_norm.normalized_shape == (512,)
    assert m.scale.shape == () and m.scale.item() == pytest.approx(0.1)
    # xavier-normal: std = sqrt(2 / (fan_in + fan_out))
    assert m.coarse_proj.weight.std().item() == pytest.approx(math.sqrt(2 / (512 + 128)), rel=0.05)
    assert m.fine_proj.weight.std().item() == pytest.approx(math.sqrt(2 / (256 + 128)), rel=0.05)
    params = {n for n, _ in m.named_parameters()}
    assert params == {
        "fine_norm.weight",
        "fine_norm.bias",
        "coarse_norm.weight",
        "coarse_norm.bias",
        "fine_proj.weight",
        "coarse_proj.weight",
        "scale",
    }
    with pytest.raises(TypeError):
        ClusteringModule(256, 512)  # keyword-only


def test_embedding_is_layernorm_over_channels_then_projection_then_l2():
    m = _module()
    with torch.no_grad():
        m.fine_norm.weight.uniform_(0.5, 1.5)
        m.fine_norm.bias.uniform_(-0.5, 0.5)
    fine, coarse = torch.randn(2, 12, 6, 4), torch.randn(2, 20, 3, 2)
    f, c = m.embed(fine, coarse)
    mean = fine.mean(1, keepdim=True)
    var = fine.var(1, keepdim=True, unbiased=False)
    normed = (fine - mean) / torch.sqrt(var + 1e-5) * m.fine_norm.weight.view(1, -1, 1, 1)
    normed = normed + m.fine_norm.bias.view(1, -1, 1, 1)
    proj = torch.einsum("oc,bchw->bohw", m.fine_proj.weight[:, :, 0, 0], normed)
    torch.testing.assert_close(f, proj / proj.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(2, 3, 2))


def test_layernorm_eps_is_torchs_default_as_the_authors_module():
    """The authors' clustering module normalises with nn.LayerNorm's default eps 1e-5 (channels
    last). On features whose variance is near eps the choice shows: 1e-5, not timm's 1e-6."""
    m = _module()
    assert m.fine_norm.eps == m.coarse_norm.eps == 1e-5
    g = torch.Generator().manual_seed(3)
    fine = 3e-3 * torch.randn(2, 12, 4, 6, generator=g) + 0.7  # per-pixel variance ~1e-5
    coarse = 3e-3 * torch.randn(2, 20, 2, 3, generator=g) - 0.2
    with torch.no_grad():
        m.coarse_norm.weight.uniform_(0.5, 1.5, generator=g)
        m.coarse_norm.bias.uniform_(-0.5, 0.5, generator=g)

    def layer_norm(x, norm, eps):  # over channels, by the definition
        mean = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        w, b = norm.weight.view(1, -1, 1, 1), norm.bias.view(1, -1, 1, 1)
        return (x - mean) / torch.sqrt(var + eps) * w + b

    with torch.no_grad():
        for x, norm in ((fine, m.fine_norm), (coarse, m.coarse_norm)):
            want = layer_norm(x.double(), norm, 1e-5).float()
            torch.testing.assert_close(norm(x), want, rtol=1e-4, atol=1e-4)
            other = layer_norm(x.double(), norm, 1e-6).float()
            assert (norm(x) - other).abs().max() > 0.05  # the test tells the two apart
        f, c = m.embed(fine, coarse)
        proj = F.conv2d(
            layer_norm(coarse.double(), m.coarse_norm, 1e-5).float(), m.coarse_proj.weight
        )
        torch.testing.assert_close(c, F.normalize(proj, dim=1), rtol=1e-4, atol=1e-4)


def test_output_sums_to_one_and_masked_candidates_are_zero_at_corners():
    m = _module()
    a = m(torch.randn(2, 12, 6, 8), torch.randn(2, 20, 3, 4))
    assert a.shape == (2, 9, 6, 8)
    torch.testing.assert_close(a.sum(1), torch.ones(2, 6, 8))
    # row-major candidates: 0 1 2 / 3 4 5 / 6 7 8; outside the map at each corner:
    corners = {(0, 0): [0, 1, 2, 3, 6], (0, 7): [0, 1, 2, 5, 8], (5, 0): [0, 3, 6, 7, 8]}
    corners[(5, 7)] = [2, 5, 6, 7, 8]
    for (y, x), ks in corners.items():
        assert torch.all(a[:, ks, y, x] == 0), (y, x)
        inside = [k for k in range(9) if k not in ks]
        assert torch.all(a[:, inside, y, x] > 0), (y, x)
    # an edge pixel (not a corner) has exactly three candidates outside
    assert torch.all(a[:, [0, 1, 2], 0, 3] == 0) and torch.all(a[:, 3:, 0, 3] > 0)


def test_small_scale_gives_one_hot_argmax_of_cosine():
    m = _module()
    with torch.no_grad():
        m.scale.fill_(-1e-4)  # |s| is used: the sign does not matter
    fine, coarse = torch.randn(1, 12, 8, 10), torch.randn(1, 20, 4, 5)
    a = m(fine, coarse)
    f, c = m.embed(fine, coarse)
    # cosine to each candidate through the unfold listing, with padding at -2 (below any cosine)
    cand = F.unfold(F.pad(c, (1, 1, 1, 1), value=float("nan")), kernel_size=3)
    cand = cand.view(1, 8, 9, 4, 5)
    cand = cand.repeat_interleave(2, -2).repeat_interleave(2, -1)  # each child sees its parent's
    cos = torch.einsum("bchw,bckhw->bkhw", f, cand).nan_to_num(-2.0)
    top2 = cos.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2  # skip near-ties
    assert clear.float().mean() > 0.9
    assert torch.equal(a.argmax(1)[clear], cos.argmax(1)[clear])
    assert a.max(1).values[clear].min() > 0.999


def test_scale_gets_a_gradient_and_matches_reference_path():
    m = _module()
    fine, coarse = torch.randn(1, 12, 4, 6), torch.randn(1, 20, 2, 3)
    a = m(fine, coarse)
    f, c = m.embed(fine, coarse)
    torch.testing.assert_close(a, reference.clustering(f, c, m.scale), rtol=1e-5, atol=1e-6)
    (a[:, 4] ** 2).sum().backward()
    assert m.scale.grad is not None and m.scale.grad.abs() > 0
    assert m.fine_proj.weight.grad.abs().sum() > 0 and m.coarse_norm.weight.grad.abs().sum() > 0


def _assignments(b: int, h: int, w: int, seed: int = 0) -> list[torch.Tensor]:
    """Soft assignments fine to coarse for strides 4->8, 8->16, 16->32 of a stride-32 map h x w."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for factor in (8, 4, 2):
        feat = F.normalize(torch.randn(b, 4, h * factor, w * factor, generator=g), dim=1)
        coarse = F.normalize(
            torch.randn(b, 4, h * factor // 2, w * factor // 2, generator=g), dim=1
        )
        out.append(reference.clustering(feat, coarse, torch.tensor(0.3)))
    return out


@pytest.mark.parametrize("levels", [0, 1, 2, 3])
def test_decode_masks_shapes(levels):
    assignments = _assignments(2, 3, 5)[3 - levels :]  # the modules sit at the deepest levels
    masks = torch.randn(2, 4, 7, 3, 5)  # e.g. 4 prediction sets x 7 queries
    # By default only the L levels that have a module: stride 32 / 2**L (the authors' decoding)
    out = decode_masks(masks, assignments)
    assert out.shape == (2, 4, 7, 3 << levels, 5 << levels)
    # levels_total=3 (the per-pixel HC models): bilinear on to stride 4
    assert decode_masks(masks, assignments, levels_total=3).shape == (2, 4, 7, 24, 40)


def test_decode_masks_levels_follow_the_deepest_modules():
    assignments = _assignments(1, 2, 3, seed=1)
    masks = torch.randn(1, 5, 2, 3)

    def up(t):
        return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

    # By default eq. (5) only: L = 1 is the 16 -> 32 module decoding 32 -> 16, and so on
    once = reference.decode(masks, assignments[2])
    twice = reference.decode(once, assignments[1])
    torch.testing.assert_close(decode_masks(masks, assignments[2:]), once)
    torch.testing.assert_close(decode_masks(masks, assignments[1:]), twice)
    assert decode_masks(masks, []) is masks  # L = 0: nothing to decode
    # levels_total=3: the levels without a module are 2x bilinear (32 -> 16 -> 8 -> 4)
    torch.testing.assert_close(decode_masks(masks, assignments[2:], 3), up(up(once)))
    torch.testing.assert_close(decode_masks(masks, assignments[1:], 3), up(twice))
    torch.testing.assert_close(decode_masks(masks, [], 3), up(up(up(masks))))


def test_decode_masks_full_hierarchy_with_one_hot_assignments_copies_the_cluster_value():
    # hard clustering view (eq. 2): each stride-4 pixel gets the value of its stride-32 cluster
    g = torch.Generator().manual_seed(2)
    soft = _assignments(2, 3, 4, seed=2)
    one_hot = []
    for a in soft:
        noisy = a + 0.3 * torch.rand(a.shape, generator=g) * (a > 0)  # keep outside at 0
        one_hot.append(F.one_hot(noisy.argmax(1), 9).permute(0, 3, 1, 2).float())
    masks = torch.randn(2, 6, 3, 4)
    out = decode_masks(masks, one_hot)
    labels = ops.hard_clusters(one_hot)[0]  # [2, 24, 32] index of the stride-32 cell
    expected = masks.flatten(2).gather(2, labels.flatten(1)[:, None].expand(-1, 6, -1))
    torch.testing.assert_close(out, expected.view(2, 6, 24, 32))


def _reference_decode_masks(masks, assignments, levels_total=None):
    if levels_total is None:
        levels_total = len(assignments)
    x = masks
    for step in range(levels_total):
        if step < len(assignments):
            x = reference.decode(x, assignments[len(assignments) - 1 - step])
        else:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return x


@pytest.mark.parametrize("levels_total", [None, 3])
@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("channels", [3, 40])  # fewer channels than the 12 cells, and more
def test_decode_masks_matches_the_level_by_level_reference_with_gradients(
    levels, channels, levels_total
):
    # 40 channels over a 3 x 4 coarse map take the one-hot-basis path of decode_masks, 3 the
    # level-by-level one: both must give eq. (5) applied level by level, and its gradients
    assert BASIS_DECODE_MAX_CELLS >= 3 * 4
    assignments = [a.requires_grad_() for a in _assignments(2, 3, 4, seed=5)[3 - levels :]]
    masks = torch.randn(2, channels, 3, 4, requires_grad=True)
    out = decode_masks(masks, assignments, levels_total)
    want = _reference_decode_masks(masks, assignments, levels_total)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, [masks, *assignments], grad)
    want_grads = torch.autograd.grad(want, [masks, *assignments], grad)
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected)


def test_decode_masks_stacked_sets_equal_one_by_one():
    assignments = _assignments(2, 2, 2, seed=3)
    sets = torch.randn(2, 3, 4, 2, 2)
    stacked = decode_masks(sets, assignments)
    for i in range(3):
        torch.testing.assert_close(stacked[:, i], decode_masks(sets[:, i], assignments))


def test_decode_masks_rejects_mismatched_assignments():
    assignments = _assignments(1, 2, 3)
    with pytest.raises(ValueError, match=r"needs an assignment \[1, 9, 4, 6\]"):
        decode_masks(torch.randn(1, 2, 2, 3), assignments[:2])  # missing the deepest module
    with pytest.raises(ValueError, match="4 assignments given but only 3 levels"):
        decode_masks(torch.randn(1, 2, 2, 3), assignments + assignments[:1], levels_total=3)
    with pytest.raises(ValueError, match=r"decoding step 0 needs an assignment \[1, 9, 4, 6\]"):
        decode_masks(torch.randn(1, 2, 2, 3), assignments + assignments[:1])
    with pytest.raises(ValueError, match=r"expected masks \[B, \.\.\., h, w\]"):
        decode_masks(torch.randn(2, 3), assignments)


def test_decode_masks_keeps_contiguous_masks_contiguous():
    # downstream code may .view() the stride-4 masks: a contiguous input gives a contiguous output
    assignments = _assignments(1, 2, 3, seed=4)
    for levels in (1, 3):
        out = decode_masks(torch.randn(1, 4, 2, 3), assignments[3 - levels :])
        assert out.is_contiguous()
    a = assignments[2]
    x = torch.randn(1, 5, 2, 3).contiguous(memory_format=torch.channels_last)
    out = ops.decode(x, a)
    assert out.is_contiguous(memory_format=torch.channels_last)  # follows x, like a conv
    torch.testing.assert_close(out, reference.decode(x.contiguous(), a))
