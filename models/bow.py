"""Hashed n-gram bag for clinical notes (``model=bow``): fastText-style, built for DP-SGD.

Every hashed word and bigram id of a note looks up a small vector (``dim`` wide); the note is
the sum of its vectors over √n (n = ids in the note: an L2-normalised bag of counts, as
TF-IDF normalises) or their mean (``pooling``); a linear head without bias gives the logits.
Word order beyond bigrams is ignored: a linear model on good fixed features is what DP-SGD
trains best (Tramer & Boneh 2021), and n-gram bags are the text analogue.

Choices measured under DP-SGD on the synthetic notes (docs/utility.md, notes):
- √n pooling, not the mean: a note's per-sample gradient on its ids then has norm ~1 whatever
  its length; the mean shrinks it by √n and the clipped budget goes to the head instead.
- No bias in the head: its noise shifts every note's logit alike and at ε = 1 drove the model
  to one class; the vectors of common words carry the prevalence (no loss without DP).
- No LayerNorm on the pooled vector: it amplified the table's noise (worse with and without DP).

Input (see ``client/tasks/notes.py``): ``tokens`` int64 ``B×L×2`` (per word position: the
hashed word id and the hashed id of the bigram it starts; 0 = none) and ``mask`` bool ``B×L``
(True where there is a word). Ids at padded positions and id 0 never count.

Cost under DP-SGD (Opacus hooks): the per-sample gradient of the table is dense,
``B × rows × dim`` floats: ``dim`` is small, and under DP the table has 2048 rows of one entry
per class (``buckets``, conf/training/bow_dp.yaml: 0.5 M floats at batch 128).
``nn.Embedding`` and a masked sum, not ``nn.EmbeddingBag``: Opacus 1.6's EmbeddingBag grad
sampler adds a repeated id's gradient once instead of once per occurrence.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import note_token_ids
from models.registry import register_model

POOLINGS = ("sqrt", "mean")


class NgramBag(nn.Module):
    """Hashed word + bigram vectors -> masked sum / √n (or mean) -> linear head."""

    grad_sample_mode = "hooks"  # how DP-SGD gets per-sample gradients (client/training.py)

    def __init__(
        self,
        vocab_buckets: int,
        max_len: int,
        num_classes: int,
        dim: int | None = None,
        buckets: int | None = None,
        pooling: str = "sqrt",
        embedding_std: float = 0.01,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if buckets is not None and not 2 <= buckets <= vocab_buckets:
            raise ValueError(f"buckets must be in [2, vocab_buckets={vocab_buckets}] or null, "
                             f"got {buckets}")
        self.max_len = max_len
        self.pooling = pooling
        # Fewer rows than the tokenizer's ids: ids are folded onto them (id 0 stays "none").
        # Under DP-SGD every row gets noise every step whether a note uses it or not.
        self.buckets = buckets if buckets is not None and buckets < vocab_buckets else None
        # One table for word and bigram ids (the tokenizer hashes them apart). No padding_idx:
        # Opacus's Embedding grad sampler ignores it; id 0 is masked out below instead.
        self.token_embedding = nn.Embedding(self.buckets or vocab_buckets, dim or num_classes)
        nn.init.normal_(self.token_embedding.weight, std=embedding_std)
        self.head = nn.Linear(dim or num_classes, num_classes, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = note_token_ids(tokens, self.max_len)
        counted = (mask.bool().unsqueeze(-1) & (tokens != 0)).to(torch.float32)  # B×L×2
        if self.buckets is not None:
            tokens = torch.where(tokens > 0, 1 + (tokens - 1) % (self.buckets - 1), 0)
        vectors = self.token_embedding(tokens)  # B×L×2×dim
        total = (vectors * counted.unsqueeze(-1)).sum(dim=(1, 2))
        count = counted.sum(dim=(1, 2)).clamp(min=1.0).unsqueeze(-1)
        return self.head(total / (count.sqrt() if self.pooling == "sqrt" else count))


@register_model("bow")
def build_bow(**kwargs) -> nn.Module:
    return NgramBag(**kwargs)
