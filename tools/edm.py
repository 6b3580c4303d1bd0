"""EDM preconditioning D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) and the loss (EDM Table 1; EDM2 eq. 21)."""

import numpy as np
import torch


class Denoiser(torch.nn.Module):
    """D(x; sigma) for a U-Net F, float32 in image space; the conditioning (class_labels, ...) is passed on as keywords."""

    def __init__(self, net, sigma_data=0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(self, x, sigma, **conditioning):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).broadcast_to(x.shape[:1]).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        F_x = self.net(c_in * x, c_noise, **{k: v for k, v in conditioning.items() if v is not None})
        return c_skip * x + c_out * F_x.to(torch.float32)


class EDMLoss(torch.nn.Module):
    """Loss at ln(sigma) ~ N(P_mean, P_std^2): lambda (D - y)^2, or lambda / e^u (D - y)^2 + u (EDM2 eq. 21), meaned over C*H*W."""

    WEIGHTINGS = ("uncertainty", "scaled")

    def __init__(self,
        sigma_data      = 0.5,              # Std of the data (images in [-1, 1]).
        P_mean          = -1.2,             # Mean of ln(sigma) during training.
        P_std           = 1.2,              # Std of ln(sigma) during training.
        loss_weighting  = "uncertainty",    # 'uncertainty' (learned, EDM2 eq. 21) or 'scaled' (plain EDM).
        logvar_channels = 128,              # Fourier features of the uncertainty head u(sigma).
    ):
        super().__init__()
        self.P_mean, self.P_std, self.sigma_data, self.weighting = P_mean, P_std, sigma_data, loss_weighting
        if loss_weighting == "uncertainty":
            generator = torch.Generator().manual_seed(0)  # fixed features, independent of the global seed
            self.register_buffer("logvar_freqs", 2 * np.pi * torch.randn(logvar_channels, generator=generator))
            self.register_buffer("logvar_phases", 2 * np.pi * torch.rand(logvar_channels, generator=generator))
            self.logvar_linear = torch.nn.Linear(logvar_channels, 1, bias=False)
            torch.nn.init.zeros_(self.logvar_linear.weight)  # u = 0 at start: the plain 'scaled' loss

    def sigma(self, normal):
        """Training noise levels from standard normals: ln(sigma) ~ N(P_mean, P_std^2)."""
        return (normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2: unit loss scale at every level (EDM Table 1)."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def uncertainty(self, sigma):
        """u(sigma), the learned log-variance of the loss, in float32 even under autocast (bf16 is ~1% off in e^u)."""
        with torch.autocast(sigma.device.type, enabled=False):
            c_noise = sigma.to(torch.float32).log().flatten() / 4
            features = np.sqrt(2) * torch.cos(c_noise.ger(self.logvar_freqs) + self.logvar_phases)
            return self.logvar_linear(features).flatten()

    def forward(self, denoiser, images, normals, **conditioning):
        """(per-sample loss [N], sigma [N]); `normals` (StepNormals rows) give the noise levels first, then the noise."""
        sigma = self.sigma(normals.randn())
        return self.at(denoiser, images, sigma, normals.randn(*images.shape[1:]), **conditioning), sigma

    def at(self, denoiser, images, sigma, noise, **conditioning):
        """Per-sample loss [N] at given noise levels and noise: the mean over C*H*W of the weighted per-element loss."""
        sigma4 = sigma.reshape(-1, 1, 1, 1)
        denoised = denoiser(images + noise * sigma4, sigma, **conditioning)
        loss = (self.weight(sigma4) * (denoised - images) ** 2).mean(dim=(1, 2, 3))
        if self.weighting == "uncertainty":
            u = self.uncertainty(sigma)
            loss = loss / u.exp() + u
        return loss


LOSSES = {"EDMLoss": EDMLoss}  # `loss:` of a config


class EDM(torch.nn.Module):
    """Everything that trains: the denoiser and the loss head. DDP wraps this; forward returns the loss."""

    def __init__(self, net, loss):
        super().__init__()
        self.denoiser = Denoiser(net, loss.sigma_data)
        self.loss = loss

    @property
    def net(self):
        return self.denoiser.net

    def forward(self, images, normals, **conditioning):
        return self.loss(self.denoiser, images, normals, **conditioning)
