"""Fixed layers that every config shares unchanged, so the block files differ only in the paper's steps."""

import torch
import torch.nn.functional as F

from tools.mp import normalize

CLIP_ACT = 256  # Activations are clamped to [-CLIP_ACT, CLIP_ACT] after each block (fp16 safeguard).
_MASK32 = 0xFFFFFFFF


def resample(x, mode="keep"):
    """2x box-filter downsampling ('down'), 2x nearest upsampling ('up'), or identity ('keep')."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


def cosine_attention(qkv, num_heads):
    """Self-attention over pixels with q, k and v each normalised to unit RMS per head (cosine
    attention, EDM2 Config C), logits q.k / sqrt(c). qkv: [N, 3*C, H, W] -> [N, C, H, W].

    q, k and v reach scaled_dot_product_attention with unit stride along c, the layout its flash and
    memory-efficient kernels take (transposed views would send it to the math kernel).
    """
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


def _hash32(x):
    """A 32-bit integer hash (two multiply-xorshift rounds) of int64 values in [0, 2^32); products stay below 2^59."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def sample_dropout(x, p, keys, salt):
    """Dropout whose mask is a pure function of (keys[i], salt, element index) for sample i.

    keys: int64 [N], one per sample, drawn for the global batch (tools.schedule.step_draws), so a
    sample's mask is the same whatever the number of ranks or micro-batches; salt tells the layers
    apart. keys=None falls back to torch's dropout (masks from the global RNG).
    """
    if keys is None:
        return F.dropout(x, p=p)
    idx = _hash32(torch.arange(x[0].numel(), device=x.device, dtype=torch.int64))
    key = _hash32((keys + salt * 0x9E3779B9) & _MASK32)  # int64 keys, drawn on x's device
    keep = _hash32(key[:, None] ^ idx[None, :]) >= round(p * 2 ** 32)
    return torch.where(keep.reshape(x.shape), x / (1 - p), 0)
