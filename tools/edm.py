"""EDM preconditioning and training loss (Karras et al. 2022, Table 1; EDM2 eq. 21 for the learned weighting).

Every config uses the same wrapper around its U-Net: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).
"""

import numpy as np
import torch

LOSS_WEIGHTINGS = ("uncertainty", "scaled")


class Denoiser(torch.nn.Module):
    """D(x; sigma) for a U-Net F; x and the output are in image space ([-1, 1] data), float32."""

    def __init__(self, net, sigma_data=0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x, sigma, class_labels=None, dropout_keys=None, augment_labels=None):
        """D(x; sigma). augment_labels: what non-leaky augmentation did to each training image (tools/augment.py);
        None (sampling, evaluation, the probe) is the zero vector, the un-augmented data."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).broadcast_to(x.shape[:1]).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        F_x = self.net(c_in * x, c_noise, class_labels, dropout_keys, augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)


class EDMLoss(torch.nn.Module):
    """Denoising loss at log-normal noise levels, ln(sigma) ~ N(P_mean, P_std^2).

    weighting='scaled':      lambda(sigma) * (D - y)^2, lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    weighting='uncertainty': lambda(sigma) / exp(u(sigma)) * (D - y)^2 + u(sigma), with u a learned
                             linear function of fixed Fourier features of c_noise (EDM2 eq. 21), which
                             equalises the loss across noise levels.
    Reduction: mean over all elements (batch and C*H*W), so the logged loss is O(1) whatever the image
    size; with Adam this changes the update only through eps.
    """

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, weighting="uncertainty", logvar_channels=128):
        super().__init__()
        self.P_mean, self.P_std, self.sigma_data, self.weighting = P_mean, P_std, sigma_data, weighting
        if weighting == "uncertainty":
            generator = torch.Generator().manual_seed(0)  # fixed features, independent of the global seed
            self.register_buffer("logvar_freqs", 2 * np.pi * torch.randn(logvar_channels, generator=generator))
            self.register_buffer("logvar_phases", 2 * np.pi * torch.rand(logvar_channels, generator=generator))
            self.logvar_linear = torch.nn.Linear(logvar_channels, 1, bias=False)
            torch.nn.init.zeros_(self.logvar_linear.weight)  # u = 0 at start: the plain 'scaled' loss

    def sample_sigma(self, n, generator=None, device=None):
        return (torch.randn(n, generator=generator, device=device) * self.P_std + self.P_mean).exp()

    def uncertainty(self, sigma):
        """u(sigma), the learned log-variance of the loss at noise level sigma (per sample), in float32
        even under autocast: a bf16 u would be off by up to ~1% in exp(u)."""
        with torch.autocast(sigma.device.type, enabled=False):
            c_noise = sigma.to(torch.float32).log().flatten() / 4
            features = np.sqrt(2) * torch.cos(c_noise.ger(self.logvar_freqs) + self.logvar_phases)
            return self.logvar_linear(features).flatten()

    def forward(self, denoiser, images, sigma, noise, class_labels=None, dropout_keys=None, augment_labels=None):
        """Per-sample loss, [N]: the mean over C*H*W of the weighted per-element loss."""
        sigma4 = sigma.reshape(-1, 1, 1, 1)
        denoised = denoiser(images + noise * sigma4, sigma, class_labels, dropout_keys, augment_labels)
        weight = (sigma4 ** 2 + self.sigma_data ** 2) / (sigma4 * self.sigma_data) ** 2
        loss = (weight * (denoised - images) ** 2).mean(dim=(1, 2, 3))
        if self.weighting == "uncertainty":
            u = self.uncertainty(sigma)
            loss = loss / u.exp() + u
        return loss


class EDM(torch.nn.Module):
    """Everything that trains: the denoiser and the loss head. DDP wraps this; forward returns the loss."""

    def __init__(self, net, sigma_data=0.5, P_mean=-1.2, P_std=1.2, loss_weighting="uncertainty", logvar_channels=128):
        super().__init__()
        self.denoiser = Denoiser(net, sigma_data)
        self.loss = EDMLoss(P_mean, P_std, sigma_data, loss_weighting, logvar_channels)

    @property
    def net(self):
        return self.denoiser.net

    def forward(self, images, sigma, noise, class_labels=None, dropout_keys=None, augment_labels=None):
        """Per-sample loss [N]; dropout_keys (int64 [N], tools.schedule.step_draws) fix the dropout masks;
        augment_labels are the augmentation vectors of augmented images (tools/batches.py)."""
        return self.loss(self.denoiser, images, sigma, noise, class_labels, dropout_keys, augment_labels)
