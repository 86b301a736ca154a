"""Reference eq. (3) and eq. (5): the unfold/einsum formulation of the paper's appendix C.

Listing 1 (clustering) and Listing 2 (decode) written out as the paper gives them, plus the one
thing the authors' released code adds: candidates in the zero padding (outside the coarse map) get a
large negative logit before the softmax. This module is the readable ground truth that the fast
path (``hcformer.ops.fast``) is tested against; it materialises the 9x unfolded coarse map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hcformer.ops._checks import check_clustering_args, check_decode_args, outside_mask

EPS = 1e-8  # logits = cosine / (EPS + |s|), as the authors' code


def assignment_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of eq. (3)'s assignment for features of ``dtype``: float32 for half precision
    (see ``masked_logits``), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def masked_logits(similarity: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Logits of eq. (3) from the similarities [B, 9, H, W]: cosine / (1e-8 + |s|), padding masked.

    The paper's Listing 1 does not mask; the authors' code does (a zero-padded candidate would
    otherwise get logit 0 and steal probability at the image border), so we follow the code. We
    mask by position; the authors test for a similarity of exactly 0, which differs only for a
    real candidate at exactly zero cosine. The mask value is the dtype's lowest finite number,
    below any real logit whatever |s| is.
    Half-precision similarities are promoted to float32 first: the assignment is then float32.
    """
    h, w = similarity.shape[-2:]
    if similarity.dtype in (torch.float16, torch.bfloat16):
        # cosine / |s| overflows half precision once |s| < 1.5e-5 (the regulariser drives s to 0)
        similarity = similarity.float()
    logits = similarity / (EPS + scale.abs())
    outside = outside_mask(h // 2, w // 2, device=similarity.device)
    return logits.masked_fill(outside, torch.finfo(logits.dtype).min)


def clustering(
    feat: torch.Tensor, downsampled_feat: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Soft assignment of eq. (3) over the local 3x3 neighbourhood (Sec. 2.4), Listing 1.

    Arguments:
      feat: [B, C, H, W] fine features, L2-normalised over C.
      downsampled_feat: [B, C, H/2, W/2] coarse features (the cluster prototypes), L2-normalised.
      scale: 0-d tensor, the trainable s of eq. (3).

    Returns:
      [B, 9, H, W]: for each fine pixel, the softmax over the 3x3 coarse cells around its parent,
      in ``F.unfold`` order (row-major, index 4 = the parent); candidates outside the map are 0.
    """
    check_clustering_args(feat, downsampled_feat, scale)
    b, c, h, w = feat.shape
    candidates = F.unfold(downsampled_feat, kernel_size=3, padding=1).reshape(b, c, 9, -1)
    pixels = F.unfold(feat, kernel_size=2, stride=2).reshape(b, c, 4, -1)
    similarity = torch.einsum("bkcn,bkpn->bcpn", candidates, pixels).reshape(b * 9, 4, -1)
    similarity = F.fold(similarity, (h, w), kernel_size=2, stride=2).reshape(b, 9, h, w)
    return masked_logits(similarity, scale).softmax(1)


def decode(x: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Cluster-based decoding of eq. (5), Listing 2.

    Arguments:
      x: [B, C, H/2, W/2] values at the coarse level (e.g. mask logits).
      assignment: [B, 9, H, W] soft assignment of eq. (3).

    Returns:
      [B, C, H, W]: each fine value is the assignment-weighted combination of the values of its
      parent's 3x3 neighbourhood in ``x`` (zero outside the map).
    """
    check_decode_args(x, assignment)
    b, _, h, w = assignment.shape
    c = x.shape[1]
    candidates = F.unfold(x, kernel_size=3, padding=1).reshape(b, c, 9, -1)
    weights = F.unfold(assignment, kernel_size=2, stride=2).reshape(b, 9, 4, -1)
    decoded = torch.einsum("bkcn,bcpn->bkpn", candidates, weights).reshape(b, c * 4, -1)
    return F.fold(decoded, (h, w), kernel_size=2, stride=2)
