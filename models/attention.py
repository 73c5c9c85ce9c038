"""A small transformer encoder for clinical notes that Opacus can train.

Built from layers with per-sample gradient support only: ``nn.Embedding`` (hashed word and
bigram ids, positions), ``nn.Linear`` (token projection, fused q/k/v, out, feed-forward, head)
and ``nn.LayerNorm`` without affine parameters (each is followed by a linear map that absorbs
any scale and shift); attention itself is ``F.scaled_dot_product_attention``, which has no
parameters. Not
``nn.MultiheadAttention`` (Opacus rejects it) nor Opacus's ``DPMultiheadAttention`` (wrong with
``batch_first=True`` and more than one head in Opacus 1.6.0, upstream #774).

Input (see ``client/tasks/notes.py``): ``tokens`` int64 ``B×L×2`` (per word position: the
hashed word id and the hashed id of the bigram it starts; 0 = none) and ``mask`` bool ``B×L``
(True where there is a word). Padded positions never influence the output: they are excluded
as attention keys and from the pooled mean, so whatever ids they hold does not matter.

Cost under DP-SGD (Opacus hooks; simulations/benchmarks/training.py ``--per-step``): the
token and position tables' per-sample gradients stay sparse (models/dp_embedding.py: the rows
a note touched, never B × vocab_buckets × width), and the ``Linear`` layers (models/layers.py)
skip autograd's weight gradient, which DP-SGD replaces by the clipped per-sample sum. What is
left is the per-sample gradients of the linear maps themselves. ``token_dim`` factorises the
table (ALBERT-style: ``vocab_buckets × token_dim`` then a linear map to ``d_model``), which
keeps every bucket its own vector; with sparse tables it is a modelling choice, no longer a
cost one. Ghost clipping runs a second backward pass and measured slower here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import Linear, note_token_ids
from models.registry import register_model


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + FF(LN(x))."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(d_model, elementwise_affine=False)
        # q, k and v in one layer: one per-sample gradient (one batched matmul) instead of three
        self.qkv = Linear(d_model, 3 * d_model)
        self.out = Linear(d_model, d_model)
        self.ff_norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.ff_in = Linear(d_model, ff_dim)
        self.ff_out = Linear(ff_dim, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.reshape(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        h = self.attn_norm(x)
        q, k, v = (self._heads(t) for t in self.qkv(h).chunk(3, dim=-1))
        # key_mask B×1×1×L (True = may be attended to): padded words are never keys
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        a = a.transpose(1, 2).reshape(batch, length, width)
        x = x + self.out(a)  # out of place: Opacus hooks forbid in-place ops
        return x + self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))


class NoteEncoder(nn.Module):
    """Hashed word + bigram embeddings, positions, ``num_layers`` blocks, masked mean, head."""

    grad_sample_mode = "hooks"  # how DP-SGD gets per-sample gradients (client/training.py)

    def __init__(
        self,
        vocab_buckets: int,
        max_len: int,
        num_classes: int,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        ff_dim: int = 128,
        dropout: float = 0.1,
        embedding_std: float = 0.1,
        token_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        # One table for word and bigram ids (the tokenizer hashes them apart); no padding_idx:
        # Opacus's Embedding grad sampler ignores it, and padded positions get no gradient anyway.
        # token_dim (None: d_model, no projection) factorises it to keep DP-SGD cheap.
        self.token_embedding = nn.Embedding(vocab_buckets, token_dim or d_model)
        self.token_projection = Linear(token_dim, d_model, bias=False) if token_dim else None
        self.position_embedding = nn.Embedding(max_len, d_model)
        # Small initial embeddings: the pre-norm residual stream then adapts quickly under SGD.
        nn.init.normal_(self.token_embedding.weight, std=embedding_std)
        nn.init.normal_(self.position_embedding.weight, std=embedding_std)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, ff_dim) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(d_model, elementwise_affine=False)
        # Dropout on the embeddings and the pooled vector only: inside the blocks its random
        # masks cost about a third of a CPU training step for little gain at this size.
        self.dropout = nn.Dropout(dropout)
        self.head = Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = note_token_ids(tokens, self.max_len)
        mask = mask.bool()
        # Drop the trailing positions that are padding in every note of the batch: the output
        # does not depend on them, and attention costs length².
        used = mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if len(used) else 1
        tokens, mask = tokens[:, :length].contiguous(), mask[:, :length]
        batch = tokens.shape[0]
        # A real batch dimension (repeat, not expand): Opacus computes per-sample gradients
        # of the position table from this input.
        positions = torch.arange(length, device=tokens.device).unsqueeze(0).repeat(batch, 1)
        words = self.token_embedding(tokens).sum(dim=2)
        if self.token_projection is not None:
            words = self.token_projection(words)
        x = words + self.position_embedding(positions)
        x = self.dropout(x)
        # A note with no words at all would have no key to attend to (softmax of all -inf =
        # NaN); let it attend everywhere instead, its pooled vector is zero regardless.
        empty = ~mask.any(dim=1, keepdim=True)
        key_mask = (mask | empty)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        x = self.final_norm(x)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


@register_model("attention")
def build_attention(**kwargs) -> nn.Module:
    return NoteEncoder(**kwargs)
