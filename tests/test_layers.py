"""tools/layers.py: dropout masks that belong to the sample, whatever the batch."""

import torch

from tools.layers import sample_dropout


def test_sample_dropout_mask_belongs_to_the_sample():
    """A sample's mask is a function of its key and the layer's salt only, so splitting a batch over ranks
    or micro-batches leaves every mask unchanged; the rate is p and kept values are scaled by 1/(1-p)."""
    g = torch.Generator().manual_seed(0)
    x, keys, p = torch.randn(64, 16, 8, 8, generator=g) + 3, torch.randint(2 ** 31, (64,), generator=g), 0.3
    full = sample_dropout(x, p, keys, salt=5)
    split = torch.cat([sample_dropout(x[i:i + 16], p, keys[i:i + 16], salt=5) for i in range(0, 64, 16)])
    assert torch.equal(full, split)
    kept = full != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01  # 65,536 draws: 5 standard deviations
    torch.testing.assert_close(full[kept], x[kept] / (1 - p), rtol=0, atol=0)
    for other in (sample_dropout(x, p, keys, salt=6) != 0, sample_dropout(x, p, keys + 1, salt=5) != 0):
        agree = (other == kept).float().mean().item()  # independent masks agree on (1-p)^2 + p^2 = 0.58
        assert abs(agree - 0.58) < 0.01, agree
