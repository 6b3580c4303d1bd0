"""The gradient noise scale (tools/gns.py) against linear regression, where it is known in closed form (one rank with
micro-batches against two ranks: tests/test_multirank.py)."""

import pytest
import torch

from tools.gns import NoiseScale


def regression_noise_scale(steps, batch, micro, dim=8, noise_std=0.5, seed=0):
    """NoiseScale on least squares y = x.w* + eps, x ~ N(0, I), at a fixed w = w* + d, as a training step feeds it."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=g, dtype=torch.float64)
    d = torch.randn(dim, generator=g, dtype=torch.float64) * 0.3
    w = torch.nn.Parameter(w_true + d)
    ns = NoiseScale([w], micro, batch, batch, "cpu")
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        y = x @ w_true + noise_std * torch.randn(batch, generator=g, dtype=torch.float64)
        for m in range(0, batch, micro):
            loss = 0.5 * (x[m:m + micro] @ w - y[m:m + micro]) ** 2
            (loss.sum() / batch).backward()
            ns.end_micro_batch()
        ns.end_step(torch.linalg.vector_norm(w.grad), torch.tensor(True))
        w.grad = None
    # Per-example gradient x (x.d - eps): mean G = d, E|g|^2 = (dim + 2)|d|^2 + dim noise^2 for Gaussian x.
    grad_sq = float(d @ d)
    trace = (dim + 1) * grad_sq + dim * noise_std ** 2
    return ns.estimate(), grad_sq, trace


def test_the_noise_scale_of_linear_regression_is_the_analytic_one():
    """B_simple = tr(Sigma) / |G|^2 = ((D + 1)|d|^2 + D s^2) / |d|^2 (= 14.3 here); the estimate over 2,000 steps of 8
    micro-batches is within 3% of it (its spread over seeds 0-5 is 0.5-0.9% for each of the three numbers)."""
    est, grad_sq, trace = regression_noise_scale(steps=2000, batch=64, micro=8)
    assert est["gns_trace_sigma"] == pytest.approx(trace, rel=0.03)
    assert est["gns_grad_sq"] == pytest.approx(grad_sq, rel=0.03)
    assert est["gns_b_simple"] == pytest.approx(trace / grad_sq, rel=0.03)


def test_without_two_batch_sizes_there_is_no_estimate():
    w = torch.nn.Parameter(torch.ones(3))
    ns = NoiseScale([w], 16, 16, 16, "cpu")
    (w.sum() ** 2).backward()
    ns.end_micro_batch()
    ns.end_step(torch.linalg.vector_norm(w.grad), torch.tensor(True))
    assert ns.estimate() == {} and not ns.hooks


def test_a_nonfinite_step_is_left_out():
    w = torch.nn.Parameter(torch.ones(3))
    ns = NoiseScale([w], 8, 32, 32, "cpu")
    for finite in (True, False):
        for _ in range(4):
            (w.sum() / 4 * (1.0 if finite else float("inf"))).backward()
            ns.end_micro_batch()
        ns.end_step(torch.linalg.vector_norm(w.grad), torch.tensor(finite))
        w.grad = None
    est = ns.estimate()
    # Every finite micro-batch's mean gradient is (1, 1, 1), as is the step's: no noise, |G|^2 = 3 (float32 norms).
    assert est["gns_trace_sigma"] == pytest.approx(0, abs=1e-5) and est["gns_grad_sq"] == pytest.approx(3, rel=1e-6)
