"""Per-sample gradients of ``nn.Embedding`` tables kept sparse: only the rows a record touched.

Opacus's Embedding sampler writes a dense B × vocabulary × width tensor every step (the notes
encoder's hashed token table: B × 8192 × width floats, mostly zeros), and ``DPOptimizer``'s clip
step reads it twice (per-sample norms, then the clipped sum). A record's gradient is non-zero
only in the rows of its own ids. Here the sampler keeps what the backward pass gives, the ids
(B × K) and the gradient at each looked-up vector (B × K × width, Opacus's ``p.grad_sample``
slot), and the optimizer's clip step computes from them, exactly:

- record b's squared norm Σ_v ‖Σ_{k: ids[b,k] = v} rows[b,k]‖² (a record's rows of one id are
  summed first: one ``torch.unique`` over (record, id) pairs, one ``index_add_``);
- the clipped sum Σ_b c_b · (record b's rows added into their ids' rows), one ``index_add_``.

These are the dense path's numbers up to summation order (tests/test_dp_step_exact.py compares
them in float64 with one backward pass per record). Noise, scaling and accounting are
``DPOptimizer``'s own: only ``clip_and_accumulate`` differs.

Opt-in per optimizer: :func:`use_sparse_embeddings` changes the class of the optimizer that
``PrivacyEngine.make_private`` returned, in place (for privacy/secure_noise.py's reason: the
accountant's step hook is stored on that object), to one whose clip step reads these, and
marks the model's tables; :func:`release_sparse_embeddings` unmarks them. An unmarked table
gets Opacus's dense per-sample gradient (another optimizer, the privacy audit's canaries, which
append dense rows to ``p.grad_sample``). Registered for ``nn.Embedding`` on import of ``models``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.optimizers import DPOptimizer
from torch import nn

_SPARSE = "sparse_per_sample"  # attribute on a marked table's weight


def _is_sparse(param: nn.Parameter) -> bool:
    return getattr(param, _SPARSE, False)


@register_grad_sampler(nn.Embedding)
def embedding_grad_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    weight = layer.weight
    if type(layer) is not nn.Embedding or not weight.requires_grad or not _is_sparse(weight):
        return compute_embedding_grad_sample(layer, activations, backprops)
    batch = backprops.shape[0]
    ids = activations[0].flatten(1)  # B × K, also for an empty Poisson batch
    rows = backprops.reshape(batch, ids.shape[1], layer.embedding_dim)
    if hasattr(weight, "_current_grad_sample"):
        # The table was looked up again in the same forward pass: the record's ids and rows
        # are the union of both lookups (Opacus would add two dense tensors here).
        weight.grad_sample_ids = torch.cat([weight.grad_sample_ids, ids], dim=1)
        weight._current_grad_sample = torch.cat([weight._current_grad_sample, rows], dim=1)
        return {}
    weight.grad_sample_ids = ids
    return {weight: rows}


def sparse_norms_and_rows(ids: torch.Tensor, rows: torch.Tensor, vocabulary: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(squared per-record norms B, table row of each distinct (record, id), that record's
    gradient row) from ids B × K and rows B × K × width."""
    batch, width = ids.shape[0], rows.shape[-1]
    keys = (torch.arange(batch, device=ids.device).unsqueeze(1) * vocabulary + ids).reshape(-1)
    distinct, inverse = torch.unique(keys, return_inverse=True)
    summed = rows.new_zeros(len(distinct), width).index_add_(0, inverse, rows.reshape(-1, width))
    record = distinct // vocabulary
    squared = rows.new_zeros(batch).index_add_(0, record, summed.square().sum(dim=1))
    return squared, distinct, summed


class DPOptimizerSparseEmbeddings(DPOptimizer):
    """``DPOptimizer`` whose clip step reads marked tables' per-sample gradients as (ids, rows)."""

    def clip_and_accumulate(self) -> None:
        params = self.params
        squared, sparse = [], {}
        for p in params:
            if isinstance(p.grad_sample, list):
                raise ValueError("sparse embedding clipping takes one backward pass per "
                                 "optimizer step (Poisson sampling does not accumulate)")
            if p.grad_sample is None:
                raise ValueError("a parameter has no per-sample gradient: run backward() "
                                 "before each optimizer step")
            grad_sample = p.grad_sample.to(p.dtype)
            if _is_sparse(p):
                ids = getattr(p, "grad_sample_ids", None)
                if ids is None or len(ids) != len(grad_sample):
                    raise ValueError("a sparse embedding table has per-sample rows but no "
                                     "matching ids: was it looked up outside its nn.Embedding?")
                norms, distinct, summed = sparse_norms_and_rows(ids, grad_sample, p.shape[0])
                sparse[p] = (distinct, summed)
                squared.append(norms)
            else:
                squared.append(grad_sample.flatten(1).square().sum(dim=1))
        # the norm over all parameters, as DPOptimizer: ‖(‖g_p‖)_p‖ = sqrt(Σ_p ‖g_p‖²)
        norms = torch.stack(squared, dim=1).sum(dim=1).sqrt()
        clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            if p in sparse:
                distinct, summed = sparse[p]
                record, row = distinct // p.shape[0], distinct % p.shape[0]
                grad = torch.zeros_like(p).index_add_(
                    0, row, summed * clip.to(summed.dtype)[record].unsqueeze(1))
                p.grad_sample_ids = None  # consumed: a second step without backward fails
            else:
                grad = torch.einsum("i,i...", clip.to(p.dtype), p.grad_sample.to(p.dtype))
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad


def use_sparse_embeddings(optimizer: DPOptimizer, model: nn.Module) -> DPOptimizer:
    """Sparse per-sample gradients for ``model``'s ``nn.Embedding`` tables, clipped by
    ``optimizer`` (what ``make_private`` returned, flat clipping, hooks). Another optimizer
    class is returned unchanged and the tables keep Opacus's dense path."""
    if type(optimizer) is DPOptimizer:
        optimizer.__class__ = DPOptimizerSparseEmbeddings
    if type(optimizer) is not DPOptimizerSparseEmbeddings:
        return optimizer
    params = {id(p) for p in optimizer.params}
    for module in model.modules():
        if type(module) is nn.Embedding and id(module.weight) in params:
            setattr(module.weight, _SPARSE, True)
    return optimizer


def release_sparse_embeddings(model: nn.Module) -> None:
    """Back to Opacus's dense per-sample gradients for ``model``'s tables."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for name in (_SPARSE, "grad_sample_ids"):
                if hasattr(module.weight, name):
                    delattr(module.weight, name)
