"""Per-sample gradients of ``nn.Embedding`` tables kept sparse: only the rows a record touched.

Opacus's Embedding sampler writes a dense B × vocabulary × width tensor every step (the notes
encoder's hashed token table: B × 8192 × width floats, mostly zeros), and ``DPOptimizer``'s clip
step reads it twice (per-sample norms, then the clipped sum). A record's gradient is non-zero
only in the rows of its own ids. Here the sampler keeps what the backward pass gives, the ids
(B × K) and the gradient at each looked-up vector (B × K × width, Opacus's ``p.grad_sample``
slot), and the optimizer's clip step computes from them, exactly:

- record b's squared norm Σ_v ‖Σ_{k: ids[b,k] = v} rows[b,k]‖² (a record's rows of one id are
  summed first, at the position of the id's last occurrence in the record: a scatter and an
  ``index_add_`` over B × K rows, no sort);
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
# Per looked-up row, the sparse path's scatter / index_add cost about as much as this many
# floats of the dense path's work (measured on CPU: the bag-of-ngrams table, 2048 × 2 with
# 256 ids a note, clips in 0.25-0.30 ms dense and 0.49-0.64 ms sparse; the encoder's
# 8192 × 8 table is several times faster sparse). A lookup takes the sparse path when
# ids per record × (width + this) < table rows × width, else Opacus's dense one.
ROW_OVERHEAD = 32


def _is_marked(param: nn.Parameter) -> bool:
    return getattr(param, _SPARSE, False)


def _has_sparse_rows(param: nn.Parameter) -> bool:
    """This step's per-sample gradient of ``param`` is (ids, rows), not Opacus's dense one."""
    return getattr(param, "grad_sample_ids", None) is not None


def sparse_is_cheaper(ids_per_record: int, table: nn.Parameter) -> bool:
    rows, width = table.shape
    return ids_per_record * (width + ROW_OVERHEAD) < rows * width


@register_grad_sampler(nn.Embedding)
def embedding_grad_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                          backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    weight = layer.weight
    batch = backprops.shape[0]
    ids = activations[0].flatten(1)  # B × K, also for an empty Poisson batch
    looked_up_before = hasattr(weight, "_current_grad_sample")  # earlier in this forward
    if (type(layer) is not nn.Embedding or not weight.requires_grad or not _is_marked(weight)
            or (looked_up_before and not _has_sparse_rows(weight))
            or (not looked_up_before and not sparse_is_cheaper(ids.shape[1], weight))):
        if hasattr(weight, "grad_sample_ids"):
            weight.grad_sample_ids = None  # this step's gradient is dense
        return compute_embedding_grad_sample(layer, activations, backprops)
    rows = backprops.reshape(batch, ids.shape[1], layer.embedding_dim)
    if looked_up_before:
        # The table was looked up again in the same forward pass: the record's ids and rows
        # are the union of both lookups (Opacus would add two dense tensors here).
        weight.grad_sample_ids = torch.cat([weight.grad_sample_ids, ids], dim=1)
        weight._current_grad_sample = torch.cat([weight._current_grad_sample, rows], dim=1)
        return {}
    weight.grad_sample_ids = ids
    return {weight: rows}


def sparse_squared_norms(ids: torch.Tensor, rows: torch.Tensor, vocabulary: int,
                         slots: torch.Tensor | None = None) -> torch.Tensor:
    """Squared per-record norms (B) of the gradient whose rows are ``rows`` (B × K × width)
    added into the table rows ``ids`` (B × K): a record's rows of one id are summed first,
    into the position of its last occurrence (the others stay zero).

    ``slots`` (B·vocabulary int64, contents ignored) is scratch space that can be reused from
    step to step: only the entries of this batch's (record, id) pairs are written and read.
    """
    batch, width = ids.shape[0], rows.shape[-1]
    if batch and ids.shape[1] and bool((ids == ids[:1]).all()) \
            and len(torch.unique(ids[0])) == ids.shape[1]:
        # every record looks up the same distinct ids (a position table): nothing to add up
        return torch.linalg.vector_norm(rows.flatten(1), dim=1).square()
    keys = (torch.arange(batch, device=ids.device).unsqueeze(1) * vocabulary + ids).reshape(-1)
    if slots is None or slots.numel() < batch * vocabulary:
        slots = torch.empty(batch * vocabulary, dtype=torch.long, device=ids.device)
    positions = torch.arange(len(keys), device=ids.device)
    slots.scatter_reduce_(0, keys, positions, reduce="amax", include_self=False)
    last = slots.index_select(0, keys)  # one position per distinct (record, id)
    summed = torch.zeros_like(rows).view(-1, width).index_add_(0, last, rows.reshape(-1, width))
    return torch.linalg.vector_norm(summed.view(rows.shape).flatten(1), dim=1).square()


class DPOptimizerSparseEmbeddings(DPOptimizer):
    """``DPOptimizer`` whose clip step reads marked tables' per-sample gradients as (ids, rows)."""

    def clip_and_accumulate(self) -> None:
        params = self.params
        squared = []
        for p in params:
            if isinstance(p.grad_sample, list):
                raise ValueError("sparse embedding clipping takes one backward pass per "
                                 "optimizer step (Poisson sampling does not accumulate)")
            if p.grad_sample is None:
                raise ValueError("a parameter has no per-sample gradient: run backward() "
                                 "before each optimizer step")
            grad_sample = p.grad_sample.to(p.dtype)
            if _has_sparse_rows(p):
                ids = p.grad_sample_ids
                if len(ids) != len(grad_sample):
                    raise ValueError("a sparse embedding table's per-sample rows and ids "
                                     "disagree: was it looked up outside its nn.Embedding?")
                squared.append(sparse_squared_norms(ids, grad_sample, p.shape[0],
                                                    self._slots(p, len(ids))))
            else:
                squared.append(torch.linalg.vector_norm(grad_sample.flatten(1), dim=1).square())
        # the norm over all parameters, as DPOptimizer: ‖(‖g_p‖)_p‖ = sqrt(Σ_p ‖g_p‖²)
        norms = torch.stack(squared, dim=1).sum(dim=1).sqrt()
        clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            factors = clip.to(p.dtype)
            if _has_sparse_rows(p):
                # Σ_b c_b · (record b's rows added into their ids' rows)
                rows = p.grad_sample.to(p.dtype) * factors.view(-1, 1, 1)
                grad = torch.zeros_like(p).index_add_(
                    0, p.grad_sample_ids.reshape(-1), rows.view(-1, p.shape[1]))
                p.grad_sample_ids = None  # consumed: a second step without backward fails
            else:
                grad = torch.einsum("i,i...", factors, p.grad_sample.to(p.dtype))
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    def _slots(self, table: nn.Parameter, batch: int) -> torch.Tensor:
        """Scratch space for ``sparse_squared_norms``, kept from step to step (allocating and
        zeroing B × vocabulary indices every step would cost more than the norms)."""
        store = self.__dict__.setdefault("_sparse_slots", {})
        slots = store.get(id(table))
        if slots is None or slots.numel() < batch * table.shape[0]:
            slots = store[id(table)] = torch.empty(batch * table.shape[0], dtype=torch.long,
                                                   device=table.device)
        return slots


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
