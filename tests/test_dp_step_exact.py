"""A site's DP-SGD step clips and sums exactly the per-record gradients of the definition (one
backward pass per record), with the sparse embedding tables and the recurrent layers' own
backward, for every model that has them; secure noise and the audit's dense path still work."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.training import DPConfig, LocalTrainingConfig, make_private, train_local
from models import dp_embedding
from models.attention import NoteEncoder
from models.bow import NgramBag
from models.dp_embedding import (
    DPOptimizerSparseEmbeddings,
    release_sparse_embeddings,
    sparse_squared_norms,
)
from models.recurrent import VitalsRNN
from privacy.secure_noise import SecureNoiseMixin, use_secure_noise

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off",
                                        "ignore:Full backward hook",
                                        "ignore:secure noise ignores")

CLIP = 0.05  # small enough that every record here is clipped, and by a different factor


def _notes(n: int, vocab: int, length: int = 9):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (n, length, 2), generator=gen)
    tokens[0, :, 0] = tokens[0, 0, 0]  # one note repeats a word: its rows must add up first
    mask = torch.rand(n, length, generator=gen) < 0.8
    mask[:, 0] = True
    mask[1, 5:] = False  # a shorter note: trailing padding
    return (tokens, mask), torch.randint(0, 2, (n,), generator=gen)


def _vitals(n: int):
    gen = torch.Generator().manual_seed(4)
    return ((torch.randn(n, 7, 6, generator=gen, dtype=torch.float64),
             torch.randn(n, 3, generator=gen, dtype=torch.float64)),
            torch.randint(0, 3, (n,), generator=gen))


# The encoders' token tables (500 rows, 18 ids a note) take the sparse path, their position
# tables (12 rows, all looked up) and the small bag's table (50 rows) Opacus's dense one.
MODELS = {
    "attention": lambda: (NoteEncoder(vocab_buckets=500, max_len=12, num_classes=2, d_model=8,
                                      num_heads=2, num_layers=1, ff_dim=8, dropout=0.0),
                          _notes(6, 500)),
    "attention_token_dim": lambda: (NoteEncoder(vocab_buckets=500, max_len=12, num_classes=2,
                                                d_model=8, num_heads=2, ff_dim=8, dropout=0.0,
                                                token_dim=3), _notes(6, 500)),
    "bow": lambda: (NgramBag(vocab_buckets=50, max_len=12, num_classes=2, dim=4), _notes(6, 50)),
    "bow_sparse": lambda: (NgramBag(vocab_buckets=500, max_len=12, num_classes=2, dim=4),
                           _notes(6, 500)),
    "lstm": lambda: (VitalsRNN(2, 3, 3, cell="lstm", hidden_size=5, num_layers=2,
                               static_size=4), _vitals(6)),
    "gru": lambda: (VitalsRNN(2, 3, 3, cell="gru", hidden_size=5, num_layers=2,
                              static_size=4), _vitals(6)),
}


def _per_record_gradients(model: nn.Module, inputs, labels) -> list[list[torch.Tensor]]:
    rows = []
    for i in range(len(labels)):
        model.zero_grad()
        one = [t[i:i + 1] for t in inputs]
        nn.functional.cross_entropy(model(*one), labels[i:i + 1]).backward()
        rows.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    return rows


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_dp_step_clips_and_sums_the_per_record_gradients_of_the_definition(name):
    torch.manual_seed(0)
    model, (inputs, labels) = MODELS[name]()
    model = model.double()
    records = _per_record_gradients(model, inputs, labels)
    norms = torch.stack([torch.sqrt(sum((g * g).sum() for g in row)) for row in records])
    factors = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 0.9).all() and len(set(factors.tolist())) == len(factors)
    expected = [sum(f * row[k] for f, row in zip(factors, records, strict=True))
                for k in range(len(records[0]))]

    loader = DataLoader(TensorDataset(*inputs, labels), batch_size=len(labels))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    hooks, optimizer, criterion, _ = make_private(
        model, optimizer, loader, nn.CrossEntropyLoss(), DPConfig(0.0, CLIP), seed=0,
        device="cpu")
    try:
        tables = [m.weight for m in model.modules() if type(m) is nn.Embedding]
        assert isinstance(optimizer, DPOptimizerSparseEmbeddings)
        optimizer.zero_grad()
        criterion(model(*inputs), labels).backward()
        sparse = {t for t in tables if getattr(t, "grad_sample_ids", None) is not None}
        for table in tables:  # a sparse table's per-record gradients were never dense
            assert (table.grad_sample.shape[1:] != table.shape) == (table in sparse)
        if hasattr(model, "position_embedding"):
            assert model.token_embedding.weight in sparse
            assert model.position_embedding.weight not in sparse
        assert bool(sparse) == (name in {"attention", "attention_token_dim", "bow_sparse"})
        optimizer.step()
        batch = optimizer.expected_batch_size
        for (pname, p), want in zip(model.named_parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad * batch, want, rtol=0, atol=1e-10, msg=pname)
    finally:
        hooks.cleanup()
        release_sparse_embeddings(model)


def test_sparse_norms_add_up_a_records_repeated_ids_before_squaring():
    ids = torch.tensor([[3, 1, 3], [0, 0, 0]])
    rows = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]],
                         [[1.0, 1.0], [1.0, 1.0], [-2.0, 0.0]]], dtype=torch.float64)
    # record 0: row 3 = (3, 1), row 1 = (0, 2) -> 10 + 4; record 1: row 0 = (0, 2) -> 4
    assert sparse_squared_norms(ids, rows, vocabulary=4).tolist() == [14.0, 4.0]
    # scratch space from another batch changes nothing
    slots = torch.full((2 * 4,), 5, dtype=torch.long)
    assert sparse_squared_norms(ids, rows, vocabulary=4, slots=slots).tolist() == [14.0, 4.0]


def test_the_same_table_looked_up_twice_in_one_forward_is_one_sparse_gradient(monkeypatch):
    monkeypatch.setattr(dp_embedding, "ROW_OVERHEAD", 0)  # sparse even for a 7-row table
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(7, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.head(self.table(a).sum(1) - 2 * self.table(b).sum(1))

    torch.manual_seed(0)
    model = Twice().double()
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randint(0, 7, (5, 4), generator=gen),
              torch.randint(0, 7, (5, 2), generator=gen))
    labels = torch.tensor([0, 1, 1, 0, 1])
    records = _per_record_gradients(model, inputs, labels)
    loader = DataLoader(TensorDataset(*inputs, labels), batch_size=5)
    hooks, optimizer, criterion, _ = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), loader, nn.CrossEntropyLoss(),
        DPConfig(0.0, 1e6), seed=0, device="cpu")  # no clipping: the plain sum
    criterion(model(*inputs), labels).backward()
    assert model.table.weight.grad_sample_ids.shape == (5, 6)
    optimizer.step()
    want = sum(row[0] for row in records)
    torch.testing.assert_close(model.table.weight.grad * optimizer.expected_batch_size, want,
                               rtol=0, atol=1e-10)
    hooks.cleanup()
    release_sparse_embeddings(model)


@contextmanager
def _private_notes_model(name: str, dp: DPConfig, *, batch_size: int = 3, **options):
    """``MODELS[name]`` (a notes model) made private as a site does, with SGD at lr 0.1; yields
    (model, (tokens, mask, labels), DP optimizer, criterion) and undoes the hooks after."""
    torch.manual_seed(0)
    model, ((tokens, mask), labels) = MODELS[name]()
    loader = DataLoader(TensorDataset(tokens, mask, labels), batch_size=batch_size)
    hooks, optimizer, criterion, _ = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader, nn.CrossEntropyLoss(),
        dp, seed=0, device="cpu", **options)
    try:
        yield model, (tokens, mask, labels), optimizer, criterion
    finally:
        hooks.cleanup()
        release_sparse_embeddings(model)


def test_an_empty_poisson_batch_is_noised_and_counted_with_sparse_tables():
    with _private_notes_model("attention", DPConfig(1.0, 1.0)) as (
            model, (tokens, mask, labels), optimizer, criterion):
        before = model.token_embedding.weight.detach().clone()
        optimizer.zero_grad()
        criterion(model(tokens[:0], mask[:0]), labels[:0]).backward()
        optimizer.step()
        assert not torch.equal(before, model.token_embedding.weight)  # noise, nothing else
        assert torch.isfinite(model.token_embedding.weight).all()


def test_secure_noise_keeps_the_sparse_clip_and_the_accounting():
    with _private_notes_model("bow", DPConfig(1.0, 1.0, secure_noise=True)) as (
            model, (tokens, mask, labels), optimizer, criterion):
        assert isinstance(optimizer, DPOptimizerSparseEmbeddings)
        assert isinstance(optimizer, SecureNoiseMixin) and isinstance(optimizer, DPOptimizer)
        assert use_secure_noise(optimizer) is optimizer  # idempotent
        steps = []
        optimizer.attach_step_hook(lambda opt: steps.append(opt.noise_multiplier))
        criterion(model(tokens, mask), labels).backward()
        optimizer.step()
        assert steps == [1.0]


def test_the_audit_gets_opacus_dense_rows_and_training_leaves_no_mark():
    with _private_notes_model("bow", DPConfig(1.0, 1.0), batch_size=6,
                              dense_per_sample=True) as (
            model, (tokens, mask, labels), optimizer, criterion):
        table = model.token_embedding.weight
        criterion(model(tokens, mask), labels).backward()
        assert table.grad_sample.shape == (6, *table.shape)  # canaries append rows of this shape
    data = TensorDataset(tokens, mask, labels)
    train_local(model, data, LocalTrainingConfig(batch_size=3), seed=0,
                dp=DPConfig(1.0, 1.0))
    assert not hasattr(table, "sparse_per_sample") and not hasattr(table, "grad_sample_ids")


def test_secure_noise_refuses_an_optimizer_that_changes_the_noise_step():
    class OwnNoise(DPOptimizer):  # as AdaClip, DDP and FSDP optimizers do
        def add_noise(self) -> None:
            super().add_noise()

    params = [nn.Parameter(torch.zeros(3))]
    optimizer = OwnNoise(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=4)
    with pytest.raises(TypeError, match="keep its noise step"):
        use_secure_noise(optimizer)
    assert type(optimizer) is OwnNoise  # left as it was, torch noise and all
