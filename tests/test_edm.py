"""tools/edm.py: the preconditioned denoiser and the loss with its learned uncertainty."""

import pytest
import torch

from tools.edm import Denoiser, EDMLoss
from tools.rng import StepNormals


def test_uncertainty_is_float32_under_autocast():
    """u(sigma) leaves autocast: exp(u) scales every sample's loss, and bf16 would cost up to ~1%."""
    loss = EDMLoss()
    torch.nn.init.normal_(loss.logvar_linear.weight)
    sigma = torch.logspace(-2, 1.9, 64)
    reference = loss.uncertainty(sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = loss.uncertainty(sigma)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, reference, rtol=0, atol=0)


def test_training_noise_levels_are_log_normal_from_the_steps_first_draw():
    """ln(sigma) ~ N(P_mean, P_std^2) (EDM2: -1.2, 1.2), made from the step's first standard-normal draw."""
    n = 2 ** 16
    sigma = EDMLoss().sigma(StepNormals(0, 3, n, "cpu").rows(slice(0, n)).randn())
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.02) and sigma.log().std().item() == pytest.approx(1.2, abs=0.02)
    images, rows = torch.zeros(4, 1, 2, 2), lambda: StepNormals(0, 3, 8, "cpu").rows(slice(4, 8))
    _, drawn = EDMLoss(loss_weighting="scaled")(Denoiser(ConstantNet(0.0), 0.5), images, rows())
    torch.testing.assert_close(drawn, EDMLoss().sigma(rows().randn()), rtol=0, atol=0)


# ------------------------------------------------------------------- preconditioning by its defining property

SIGMAS = torch.logspace(-2.7, 1.9, 24)  # 0.002 .. 79: the sampler's range


class ConstantNet(torch.nn.Module):
    """F(z, c_noise) = fill everywhere; keeps its input z, the network input c_in x."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, z, c_noise, *conditioning):
        self.z = z
        return torch.full_like(z, self.fill)


def expectation(f, sigma_data):
    """E[f(y, n)] for y ~ N(0, sigma_data^2), n ~ N(0, 1) and f(y, n) = (a y + b n)^2, the square of a linear form:
    a^2 sigma_data^2 + b^2 = f(1, 0) sigma_data^2 + f(0, 1) exactly, with no Monte-Carlo error.
    f gets y and n as [len(SIGMAS), 1, 1, 1] tensors, one noise level per row."""
    def at(y, n):
        return f(torch.full((len(SIGMAS), 1, 1, 1), y), torch.full((len(SIGMAS), 1, 1, 1), n)).flatten().double()
    return at(1.0, 0.0) * sigma_data ** 2 + at(0.0, 1.0)


def noisy(y, n):
    return y + SIGMAS.reshape(-1, 1, 1, 1) * n


# Each expectation below is a few float32 operations from 1: observed within 3 ulp (3.6e-7) at every sigma
# and sigma_data; 1e-6 leaves a margin for other CPUs' rounding and fails any misplaced sigma or sigma_data.
FLOAT32_ATOL = 1e-6


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_network_input_has_unit_variance_at_every_sigma(sigma_data):
    """EDM appendix B.6: Var[c_in (y + sigma n)] = 1 for data of std sigma_data."""
    net = ConstantNet(0.0)

    def input_sq(y, n):
        Denoiser(net, sigma_data)(noisy(y, n), SIGMAS)
        return net.z ** 2

    torch.testing.assert_close(expectation(input_sq, sigma_data), torch.ones(len(SIGMAS), dtype=torch.float64),
                               rtol=0, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_effective_training_target_has_unit_variance_at_every_sigma(sigma_data):
    """EDM appendix B.6: the F that makes D(x; sigma) = y, F_target = (y - c_skip x) / c_out, has unit variance.
    c_skip x and c_out are read from the denoiser's outputs for F = 0 and F = 1, not from its formulas."""
    def target_sq(y, n):
        x = noisy(y, n)
        d0, d1 = Denoiser(ConstantNet(0.0), sigma_data)(x, SIGMAS), Denoiser(ConstantNet(1.0), sigma_data)(x, SIGMAS)
        return ((y - d0) / (d1 - d0)) ** 2

    torch.testing.assert_close(expectation(target_sq, sigma_data), torch.ones(len(SIGMAS), dtype=torch.float64),
                               rtol=0, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_scaled_loss_of_a_zero_network_is_one_at_every_sigma(sigma_data):
    """EDM appendix B.6: lambda(sigma) = 1 / c_out^2, so with F = 0 the 'scaled' loss
    lambda E[(c_skip x - y)^2] = E[F_target^2] = 1 at every noise level."""
    loss = EDMLoss(sigma_data=sigma_data, loss_weighting="scaled")
    denoiser = Denoiser(ConstantNet(0.0), sigma_data)

    def zero_net_loss(y, n):
        return loss.at(denoiser, y, SIGMAS, n)

    torch.testing.assert_close(expectation(zero_net_loss, sigma_data), torch.ones(len(SIGMAS), dtype=torch.float64),
                               rtol=0, atol=FLOAT32_ATOL)
