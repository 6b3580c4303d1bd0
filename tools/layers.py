"""Fixed layers that every config shares unchanged, so the block files differ only in the paper's steps."""

import torch
import torch.nn.functional as F

from tools.mp import normalize
from tools.rng import mix32

CLIP_ACT = 256  # Activations are clamped to [-CLIP_ACT, CLIP_ACT] after each block (fp16 safeguard).


def resample(x, mode="keep"):
    """2x box-filter downsampling ('down'), 2x nearest upsampling ('up'), or identity ('keep')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


def cosine_attention(qkv, num_heads):
    """Cosine attention over pixels (EDM2 Config C), [N, 3C, H, W] -> [N, C, H, W]; contiguous along c for the flash kernels."""
    N, C3, H, W = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(N, num_heads, C // num_heads, 3, H * W).permute(0, 1, 3, 4, 2)  # [N, heads, 3, HW, c]
    q, k, v = normalize(qkv, dim=4).contiguous().unbind(2)        # each [N, heads, HW, c]
    y = F.scaled_dot_product_attention(q, k, v)                   # scale 1/sqrt(c) by default
    return y.permute(0, 1, 3, 2).reshape(N, C, H, W)


def group_norm(x, num_groups=32, min_channels_per_group=4):
    """Group normalisation without mean subtraction or learned scale (EDM2 Config C); removed in F."""
    N, C, H, W = x.shape
    groups = max(1, min(num_groups, C // min_channels_per_group))
    while C % groups:
        groups -= 1
    return normalize(x.reshape(N, groups, -1, H, W), dim=(2, 3, 4)).reshape(N, C, H, W)


def sample_dropout(x, p, keys, salt):
    """Dropout with sample i's mask a function of (keys[i], salt, element), split-invariant; keys=None: torch's dropout."""
    if keys is None:
        return F.dropout(x, p=p)
    idx = mix32(torch.arange(x[0].numel(), device=x.device, dtype=torch.int64))
    key = mix32((keys + salt * 0x9E3779B9) & 0xFFFFFFFF)
    keep = mix32(key[:, None] ^ idx[None, :]) >= round(p * 2 ** 32)
    return torch.where(keep.reshape(x.shape), x / (1 - p), 0)


def number_dropout_layers(net):
    """Give every layer with a `dropout_salt` its own, in module order, so that no two share a dropout mask."""
    for salt, m in enumerate(m for m in net.modules() if hasattr(m, "dropout_salt")):
        m.dropout_salt = salt
    return net
