"""Layers of Config G (paper steps F+G): the official network's block, with no group norms and the
1x1 conv plus pixel norm on the encoder's main path (F), magnitude-preserving fixed-function layers
(mp_silu, mp_sum, MP Fourier) and a learned embedding gain (G)."""

import numpy as np
import torch

from tools.layers import CLIP_ACT, cosine_attention, resample, sample_dropout
from tools.mp import mp_silu, mp_sum, normalize

RES_BALANCE = 0.3     # mp_sum weight of the residual branch (paper step G).
ATTN_BALANCE = 0.3    # mp_sum weight of the attention branch (paper step G).
CONCAT_BALANCE = 0.5  # mp_cat weight of the decoder's skip connection (paper step G).
LABEL_BALANCE = 0.5   # mp_sum weight of the class embedding against the noise embedding (paper step G).
AUGMENT_BALANCE = 0.5 # mp_sum weight of the augmentation embedding against the Fourier features (G's way; the paper has none).

#----------------------------------------------------------------------------
# Noise-level embedding.

class Fourier(torch.nn.Module):
    """Magnitude-preserving Fourier features: sqrt(2) * cos(2 pi (f x + phi)) has unit RMS."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (np.sqrt(2) * torch.cos(y)).to(x.dtype)

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
# Residual block with optional self-attention, shared by the encoder ('enc') and decoder ('dec').

class Block(torch.nn.Module):
    def __init__(self,
        in_channels,                # Number of input channels.
        out_channels,               # Number of output channels.
        emb_channels,               # Number of embedding channels.
        flavor          = "enc",    # 'enc' or 'dec'.
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
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = Conv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = Conv(emb_channels, out_channels)
        self.conv_res1 = Conv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = Conv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = Conv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = Conv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x, emb, dropout_keys=None):
        # Main branch.
        x = resample(x, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        # Residual branch.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = sample_dropout(y, self.dropout, dropout_keys, self.dropout_salt)
        y = self.conv_res1(y)
        # Connect the branches.
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=RES_BALANCE)
        # Self-attention.
        if self.num_heads != 0:
            y = cosine_attention(self.attn_qkv(x), self.num_heads)
            y = self.attn_proj(y)
            x = mp_sum(x, y, t=ATTN_BALANCE)
        return x.clamp(-CLIP_ACT, CLIP_ACT)
