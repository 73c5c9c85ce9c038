"""Secure DP noise: a ChaCha20 CSPRNG turned into N(0, 1), plugged into Opacus's noise step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus import PrivacyEngine
from opacus.optimizers import AdaClipDPOptimizer, DPOptimizer
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.secure_noise import (
    ChaCha20Gaussian,
    SecureNoiseDPOptimizer,
    SecureNoiseDPOptimizerFastGradientClipping,
    _box_muller,
    _uniform_open,
    benchmark,
    use_secure_noise,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off", "ignore:Full backward hook is firing")

KEY = bytes(range(32))  # fixed key: the distribution tests are deterministic, never flaky
KS_ALPHA = 0.001  # significance of the Kolmogorov–Smirnov test against N(0, 1)


def test_normals_are_standard_gaussian():
    samples = ChaCha20Gaussian(KEY).standard_normal(100_000).numpy()
    assert samples.dtype == np.float64 and np.isfinite(samples).all()
    assert stats.kstest(samples, "norm").pvalue > KS_ALPHA
    # 5 standard errors: mean 1/sqrt(n) ≈ 0.0032, std 1/sqrt(2n) ≈ 0.0022
    assert abs(samples.mean()) < 0.016
    assert abs(samples.std() - 1.0) < 0.011
    # both Box–Muller halves (cos and sin) are N(0, 1) on their own
    half = len(samples) // 2
    assert stats.kstest(samples[:half], "norm").pvalue > KS_ALPHA
    assert stats.kstest(samples[half:], "norm").pvalue > KS_ALPHA


def test_uniforms_exclude_zero_and_one_so_the_log_is_finite():
    extreme = np.array([0, 2**64 - 1, 0, 2**64 - 1], dtype=np.uint64)
    uniforms = _uniform_open(extreme)
    assert (uniforms > 0).all() and (uniforms < 1).all()
    assert uniforms.max() == 1 - 2.0**-53 and uniforms.min() == 2.0**-53
    normals = _box_muller(extreme)
    assert torch.isfinite(normals).all()
    assert normals.abs().max() == pytest.approx((2 * 53 * np.log(2)) ** 0.5)  # the widest tail


def test_two_generators_give_different_streams():
    first, second = ChaCha20Gaussian(), ChaCha20Gaussian()
    assert not torch.equal(first.standard_normal(1000), second.standard_normal(1000))
    # the same generator never repeats itself either
    assert not torch.equal(first.standard_normal(1000), first.standard_normal(1000))


def test_same_key_reproduces_the_stream():
    assert torch.equal(ChaCha20Gaussian(KEY).standard_normal(999),
                       ChaCha20Gaussian(KEY).standard_normal(999))


def test_keystream_is_chacha20_and_never_reuses_a_nonce_across_segments():
    source = ChaCha20Gaussian(KEY)
    source.SEGMENT_BYTES = 128  # tiny segments to cross several boundaries
    stream = bytes(source.keystream(300))

    def segment(number: int) -> bytes:
        nonce = (0).to_bytes(8, "little") + number.to_bytes(8, "little")
        return Cipher(algorithms.ChaCha20(KEY, nonce), mode=None).encryptor().update(bytes(128))

    expected = segment(0) + segment(1) + segment(2)
    assert stream == expected[:300]
    assert segment(0) != segment(1)


def _private_linear(grad_sample_mode: str = "hooks", *, noise_multiplier: float,
                    max_grad_norm: float, batch_size: int, num_examples: int):
    torch.manual_seed(0)
    model = nn.Linear(300, 100)  # 30 100 parameters
    dataset = TensorDataset(torch.randn(num_examples, 300), torch.randint(0, 100, (num_examples,)))
    loader = DataLoader(dataset, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="rdp")
    private = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode,
        **({"criterion": nn.CrossEntropyLoss()} if grad_sample_mode == "ghost" else {}),
    )
    return engine, private


def test_secure_step_adds_noise_of_the_right_scale_from_the_csprng():
    sigma, clip, batch_size, n = 1.3, 0.7, 64, 640
    engine, (model, optimizer, loader) = _private_linear(
        noise_multiplier=sigma, max_grad_norm=clip, batch_size=batch_size, num_examples=n)
    assert use_secure_noise(optimizer, key=KEY) is optimizer
    assert isinstance(optimizer, SecureNoiseDPOptimizer) and isinstance(optimizer, DPOptimizer)

    before = [p.detach().clone() for p in optimizer.params]
    x, _ = next(iter(loader))
    optimizer.zero_grad()
    (model(x) * 0.0).sum().backward()  # zero per-sample gradients: the update is pure noise
    optimizer.step()

    # lr · σ · C / expected batch size, with the noise drawn in parameter order from the key
    scale = sigma * clip / optimizer.expected_batch_size
    assert optimizer.expected_batch_size == batch_size
    expected_source = ChaCha20Gaussian(KEY)
    changes = []
    for p, p0 in zip(optimizer.params, before):
        change = (p.detach() - p0)
        expected = -expected_source.normal_like(p0, sigma * clip) / batch_size
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6)
        changes.append(change.flatten())
    std = torch.cat(changes).double().std().item()
    assert abs(std / scale - 1.0) < 0.03  # 30 100 samples: standard error of the std ≈ 0.4 %
    # the accountant saw the step exactly as without secure noise
    assert engine.accountant.history == [(sigma, batch_size / n, 1)]


def test_secure_noise_changes_nothing_but_the_noise():
    """With σ = 0 the secure optimizer's update equals Opacus's own, bit for bit."""
    updates = []
    for secure in (False, True):
        _, (model, optimizer, loader) = _private_linear(
            noise_multiplier=0.0, max_grad_norm=0.5, batch_size=32, num_examples=320)
        if secure:
            use_secure_noise(optimizer)
        x, y = next(iter(loader))
        before = [p.detach().clone() for p in optimizer.params]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        updates.append([p.detach() - p0 for p, p0 in zip(optimizer.params, before)])
    for plain, secure in zip(*updates):
        assert torch.equal(plain, secure)


def test_ghost_clipping_optimizer_is_swapped_in_place():
    sigma, clip, batch_size = 1.0, 1.0, 16
    _, (model, optimizer, criterion, loader) = _private_linear(
        "ghost", noise_multiplier=sigma, max_grad_norm=clip, batch_size=batch_size,
        num_examples=160)
    use_secure_noise(optimizer, key=KEY)
    assert isinstance(optimizer, SecureNoiseDPOptimizerFastGradientClipping)
    assert criterion.optimizer is optimizer  # the criterion drives the swapped object
    before = [p.detach().clone() for p in optimizer.params]
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(model(x) * 0.0, y).backward()
    optimizer.step()
    expected_source = ChaCha20Gaussian(KEY)
    for p, p0 in zip(optimizer.params, before):
        expected = -expected_source.normal_like(p0, sigma * clip) / batch_size
        torch.testing.assert_close(p.detach() - p0, expected, rtol=1e-4, atol=1e-6)


def test_swap_is_idempotent_and_refuses_optimizers_with_their_own_noise_step():
    _, (_, optimizer, _) = _private_linear(
        noise_multiplier=1.0, max_grad_norm=1.0, batch_size=32, num_examples=320)
    use_secure_noise(optimizer)
    source = optimizer.secure_noise_source
    assert use_secure_noise(optimizer) is optimizer and optimizer.secure_noise_source is source
    adaclip = AdaClipDPOptimizer(
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), noise_multiplier=1.0,
        max_grad_norm=1.0, expected_batch_size=8, target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2, max_clipbound=10.0, min_clipbound=0.1,
        unclipped_num_std=1.0)
    with pytest.raises(TypeError, match="AdaClipDPOptimizer"):
        use_secure_noise(adaclip)


def test_benchmark_reports_both_timings(capsys):
    result = benchmark(num_params=10_000, repeats=2)
    assert result["secure_s"] > 0 and result["torch_s"] > 0
    assert "ratio" in capsys.readouterr().out


def test_chunked_sampler_is_box_muller_of_the_keystream():
    """The optimized in-place path gives exactly the reference formula, chunk by chunk."""
    pairs = ChaCha20Gaussian.CHUNK_PAIRS
    n = 2 * pairs + 1001  # a full chunk, then an odd partial one
    fast = ChaCha20Gaussian(KEY).standard_normal(n)
    stream = ChaCha20Gaussian(KEY).keystream(16 * pairs + 16 * 501)
    words = np.frombuffer(stream, dtype="<u8")
    reference = torch.cat([_box_muller(words[: 2 * pairs]), _box_muller(words[2 * pairs:])[:1001]])
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-15)
    scaled = ChaCha20Gaussian(KEY).normal_like(torch.zeros(10, 3, dtype=torch.float32), 2.5)
    assert scaled.shape == (10, 3) and scaled.dtype == torch.float32
    torch.testing.assert_close(scaled.flatten(), (2.5 * _box_muller(words[:30])).float())
