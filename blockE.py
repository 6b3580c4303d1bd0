"""Layers of Config E (paper steps D+E): magnitude-preserving learned layers with forced weight
normalisation; ADM's skeleton, fixed-function layers and group norms as in Config C."""

import numpy as np
import torch

from tools.layers import CLIP_ACT, cosine_attention, group_norm, resample, sample_dropout
from tools.mp import normalize

#----------------------------------------------------------------------------
# Noise-level embedding.

class Fourier(torch.nn.Module):
    """Fourier features cos(2 pi (f x + phi)), RMS 1/sqrt(2)."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return torch.cos(y).to(x.dtype)

#----------------------------------------------------------------------------
# Learned layer: convolution, or fully connected when kernel == ().

class Conv(torch.nn.Module):
    """Magnitude-preserving convolution with forced weight normalisation (paper steps D+E).

    The stored weight is kept at unit-RMS rows after every optimizer step (forced_weight_norm,
    tools.mp.force_weight_norm_); the forward pass normalises again in the graph, which matters at
    inference where EMA weights are not unit norm, and scales by gain / sqrt(fan_in) so unit-RMS inputs
    give unit-RMS outputs.
    """

    forced_weight_norm = True

    def __init__(self, in_channels, out_channels, kernel=()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = normalize(self.weight.to(torch.float32))
        w = w * (gain / np.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)

#----------------------------------------------------------------------------
# Residual block with optional self-attention: ADM's block, the same in the encoder and the decoder.

class Block(torch.nn.Module):
    def __init__(self,
        in_channels,                # Number of input channels.
        out_channels,               # Number of output channels.
        emb_channels,               # Number of embedding channels.
        flavor          = "enc",    # 'enc' or 'dec' (ADM's block is the same in both).
        resample_mode   = "keep",   # 'keep', 'up' or 'down'.
        attention       = False,    # Include self-attention?
        channels_per_head = 64,     # Channels per attention head.
        dropout         = 0,        # Dropout probability.
    ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.dropout_salt = 0  # tells the blocks' dropout masks apart (tools.layers.number_dropout_layers)
        self.conv_res0 = Conv(in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = Conv(emb_channels, out_channels)
        self.conv_res1 = Conv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = Conv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = Conv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = Conv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x, emb, dropout_keys=None):
        # Residual branch.
        y = resample(torch.nn.functional.silu(group_norm(x)), mode=self.resample_mode)
        y = self.conv_res0(y)
        c = self.emb_linear(emb) + 1
        y = torch.nn.functional.silu(group_norm(y) * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = sample_dropout(y, self.dropout, dropout_keys, self.dropout_salt)
        y = self.conv_res1(y)
        # Shortcut, and the plain residual sum of ADM.
        x = resample(x, mode=self.resample_mode)
        if self.conv_skip is not None:
            x = self.conv_skip(x)
        x = x + y
        # Self-attention.
        if self.num_heads != 0:
            y = cosine_attention(self.attn_qkv(group_norm(x)), self.num_heads)
            y = self.attn_proj(y)
            x = x + y
        return x.clamp(-CLIP_ACT, CLIP_ACT)
