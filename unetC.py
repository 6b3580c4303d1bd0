"""U-Net of Config C (paper steps B+C): ADM's U-Net without biases, with Fourier features into ADM's
two-layer embedding MLP."""

import numpy as np
import torch

from blockC import Block, Conv, Fourier
from tools.layers import group_norm


class UNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Image channels.
        label_dim           = 0,            # Class label dimensionality. 0 = unconditional.
        augment_dim         = 0,            # Augmentation vector dimensionality (tools/augment.py). 0 = no augmentation.
        model_channels      = 128,          # Base multiplier for the number of channels.
        channel_mult        = (1, 2, 2, 2), # Per-resolution multipliers for the number of channels.
        noise_channels      = None,         # Noise embedding (Fourier) channels. None = model_channels.
        emb_channels        = None,         # Embedding channels. None = 4 * model_channels.
        num_blocks          = 2,            # Encoder blocks per resolution; the decoder has one more.
        attn_resolutions    = (16,),        # Resolutions with self-attention (plus the first bottleneck block).
        channels_per_head   = 64,           # Channels per attention head.
        dropout             = 0.13,         # Dropout probability in the residual branches.
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = noise_channels or model_channels
        cemb = emb_channels or 4 * model_channels
        block_kwargs = dict(channels_per_head=channels_per_head, dropout=dropout)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim

        # Embedding.
        self.emb_fourier = Fourier(cnoise)
        self.emb_noise = Conv(cnoise, cemb)
        self.emb_hidden = Conv(cemb, cemb)
        self.emb_label = Conv(label_dim, cemb) if label_dim else None
        self.emb_augment = Conv(augment_dim, cnoise) if augment_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # the constant-ones channel
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = Conv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc", attention=(res in attn_resolutions), **block_kwargs)

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec", attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = Conv(cout, img_channels, kernel=(3, 3))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, **block_kwargs):
        # Embedding.
        emb = self.emb_fourier(noise_labels)
        if self.emb_augment is not None:  # what was done to the image; zeros (nothing) unless training augmented it
            a = augment_labels if augment_labels is not None else emb.new_zeros(len(emb), self.augment_dim)
            emb = emb + self.emb_augment(a)
        emb = self.emb_hidden(torch.nn.functional.silu(self.emb_noise(emb)))
        if self.emb_label is not None:
            emb = emb + self.emb_label(class_labels * np.sqrt(class_labels.shape[1]))
        emb = torch.nn.functional.silu(emb)

        # Encoder.
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb, **block_kwargs)
            skips.append(x)

        # Decoder.
        for name, block in self.dec.items():
            if "block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, **block_kwargs)
        return self.out_conv(torch.nn.functional.silu(group_norm(x)))
