"""Transformer decoders of the HCFormer head on the stride-32 map (Sec. 2.5, 4.1, App. E.3).

``MaskedAttentionDecoder`` is the default: Mask2Former's masked-attention decoder run on the
single stride-32 map (each layer: cross-attention restricted to the foreground of the previous
prediction, self-attention, FFN, post-norm). It predicts once from the learnable queries and
once after every layer, so ``num_layers`` layers give ``num_layers + 1`` prediction sets (the
authors' config counts them as ``DEC_LAYERS = 9`` for 8 layers).

``StandardDecoder`` is the Table III variant: DETR's decoder as MaskFormer uses it (queries
start at zero, each layer: self-attention, cross-attention without a mask, FFN, post-norm,
one shared final LayerNorm), predicting after every layer: ``num_layers`` prediction sets.

Both return the class logits and the stride-32 mask logits of eq. (4) of every prediction
set, stacked; decoding to stride 4 (eq. 5) is the model's job. Tensors inside are
sequence-first ``[L, B, C]`` as ``nn.MultiheadAttention`` expects by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the mask embedding, 256-256-256-256)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class AttentionLayer(nn.Module):
    """Multi-head attention + dropout + residual + LayerNorm (post-norm).

    Self-attention when called with ``memory=None`` (queries, keys and values from ``tgt``);
    cross-attention otherwise. Positions are added to queries and keys, never to values.
    """

    def __init__(self, *, d_model: int, nheads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = _with_pos(tgt, query_pos)
        if memory is None:
            k, v = q, tgt
        else:
            k, v = _with_pos(memory, pos), memory
        out = self.attn(q, k, v, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    """Linear -> ReLU -> dropout -> Linear, dropout, residual, LayerNorm (post-norm)."""

    def __init__(self, *, d_model: int, dim_feedforward: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm(x + self.dropout(out))


def layer_stack(
    layer: type[nn.Module],
    num_layers: int,
    *,
    d_model: int,
    nheads: int,
    dim_feedforward: int,
    dropout: float,
) -> nn.ModuleList:
    """``num_layers`` transformer layers of class ``layer``, each with its own parameters."""
    return nn.ModuleList(
        layer(d_model=d_model, nheads=nheads, dim_feedforward=dim_feedforward, dropout=dropout)
        for _ in range(num_layers)
    )


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform init of every weight matrix of ``module``, in parameter order (DETR's and
    Mask2Former's ``_reset_parameters``); biases and norms keep their defaults."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class MaskedDecoderLayer(nn.Module):
    """One Mask2Former decoder layer: masked cross-attention, self-attention, FFN."""

    def __init__(self, *, d_model: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn = AttentionLayer(d_model=d_model, nheads=nheads, dropout=dropout)
        self.self_attn = AttentionLayer(d_model=d_model, nheads=nheads, dropout=dropout)
        self.ffn = FFNLayer(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        tgt = self.cross_attn(tgt, memory, attn_mask=attn_mask, pos=pos, query_pos=query_pos)
        tgt = self.self_attn(tgt, query_pos=query_pos)
        return self.ffn(tgt)


class DETRDecoderLayer(nn.Module):
    """One DETR decoder layer (MaskFormer's): self-attention, cross-attention, FFN."""

    def __init__(self, *, d_model: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = AttentionLayer(d_model=d_model, nheads=nheads, dropout=dropout)
        self.cross_attn = AttentionLayer(d_model=d_model, nheads=nheads, dropout=dropout)
        self.ffn = FFNLayer(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, *, pos: torch.Tensor, query_pos: torch.Tensor
    ) -> torch.Tensor:
        tgt = self.self_attn(tgt, query_pos=query_pos)
        tgt = self.cross_attn(tgt, memory, pos=pos, query_pos=query_pos)
        return self.ffn(tgt)


def attention_mask(mask_logits: torch.Tensor, nheads: int) -> torch.Tensor:
    """The boolean attention mask of masked attention from stride-32 mask logits.

    ``mask_logits`` [B, Q, h, w] -> [B * nheads, Q, h*w], True where a query may NOT attend:
    ``sigmoid(mask) < 0.5`` taken directly at stride 32 (the authors' code does not resize).
    A query whose mask is empty everywhere would attend nowhere (a NaN softmax), so such rows
    are unmasked entirely, as Mask2Former does. The mask carries no gradient.
    """
    masked = (mask_logits.detach().flatten(2) < 0).contiguous()  # sigmoid(x) < 0.5 <=> x < 0
    masked = masked & ~masked.all(dim=-1, keepdim=True)
    return masked.repeat_interleave(nheads, dim=0)


class _QueryDecoder(nn.Module):
    """What both decoders share: the class head Linear(d, K+1) and the mask embedding MLP (masks
    by eq. 4), the subclass's query embeddings (``_add_queries``), ``num_layers`` layers of class
    ``layer_type`` and the final LayerNorm, created in that order (the order of the random
    init), the layers' weight matrices Xavier-initialised.

    Arguments as :class:`MaskedAttentionDecoder`.
    """

    layer_type: type[nn.Module]

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_classes: int,
        num_queries: int,
        num_layers: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float = 0.0,
        mask_dim: int = 256,
    ) -> None:
        super().__init__()
        self.nheads = nheads
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(
            in_dim=hidden_dim, hidden_dim=hidden_dim, out_dim=mask_dim, num_layers=3
        )
        self._add_queries(num_queries, hidden_dim)
        self.layers = layer_stack(
            self.layer_type,
            num_layers,
            d_model=hidden_dim,
            nheads=nheads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        xavier_init(self.layers)

    def _add_queries(self, num_queries: int, hidden_dim: int) -> None:
        raise NotImplementedError

    def predict(
        self, queries: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries`` [..., B, Q, d] (normed), ``mask_features`` [B, D, h, w] -> logits, masks."""
        logits = self.class_embed(queries)
        masks = torch.einsum("...bqc,bchw->...bqhw", self.mask_embed(queries), mask_features)
        return logits, masks


class MaskedAttentionDecoder(_QueryDecoder):
    """Mask2Former's masked-attention decoder on one (stride-32) feature map.

    Arguments:
      hidden_dim: width d of the queries and the memory (256).
      num_classes: K; the class head predicts K + 1 logits (the last is "no object").
      num_queries: Q, the number of learnable queries.
      num_layers: decoder layers (8 in the paper; ``num_layers + 1`` prediction sets).
      nheads: attention heads (8).
      dim_feedforward: FFN width (2048).
      dropout: dropout of attention and FFN (0).
      mask_dim: width of the mask embeddings and mask features (256).
    """

    layer_type = MaskedDecoderLayer

    def _add_queries(self, num_queries: int, hidden_dim: int) -> None:
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        # One feature level: the level embedding acts as a learned bias on the memory.
        self.level_embed = nn.Embedding(1, hidden_dim)

    def _heads(
        self, tgt: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict(self.decoder_norm(tgt).transpose(0, 1), mask_features)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode.

        Arguments:
          src: the projected stride-32 memory [B, d, h, w].
          pos: its positional encoding [B, d, h, w].
          mask_features: the projected stride-32 mask features [B, D, h, w].
        Returns ``(logits [S, B, Q, K+1], masks [S, B, Q, h, w])``, S = num_layers + 1.
        """
        b = src.shape[0]
        memory = (src + self.level_embed.weight[0, :, None, None]).flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        # repeat, not expand: a view of a parameter made under no_grad still requires grad but
        # has no grad_fn, which breaks torch's FlopCounterMode (the profile) on submodule inputs.
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        tgt = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)

        logits, masks = self._heads(tgt, mask_features)
        all_logits, all_masks = [logits], [masks]
        for layer in self.layers:
            mask = attention_mask(masks, self.nheads)
            tgt = layer(tgt, memory, attn_mask=mask, pos=pos, query_pos=query_pos)
            logits, masks = self._heads(tgt, mask_features)
            all_logits.append(logits)
            all_masks.append(masks)
        return torch.stack(all_logits), torch.stack(all_masks)


class StandardDecoder(_QueryDecoder):
    """DETR's decoder as in MaskFormer (Table III): no masked attention.

    Arguments as :class:`MaskedAttentionDecoder`; ``num_layers`` prediction sets, one per layer.
    The queries start at zero and the learned ``query_embed`` is their position.
    """

    layer_type = DETRDecoderLayer

    def _add_queries(self, num_queries: int, hidden_dim: int) -> None:
        self.query_embed = nn.Embedding(num_queries, hidden_dim)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`MaskedAttentionDecoder.forward`; S = num_layers."""
        b = src.shape[0]
        memory = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)
        tgt = torch.zeros_like(query_pos)
        states = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos=pos, query_pos=query_pos)
            states.append(self.decoder_norm(tgt))
        hs = torch.stack(states).transpose(1, 2)  # [S, B, Q, d]
        return self.predict(hs, mask_features)
