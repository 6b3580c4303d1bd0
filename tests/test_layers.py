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


def test_attention_runs_on_the_flash_kernel_and_equals_the_math_kernel():
    """A Config G network with attention blocks (and E's, with group norms before them), restricted to SDPA's flash
    backend, which refuses inputs that are not laid out for it (on the CPU as on the GPU: unit stride along the
    channels), gives the math backend's output to float32 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tools.config import build_network, load_config
    for path in ("config/digits/G.yaml", "config/digits/E.yaml"):
        net = build_network(load_config(path, ["network.model_channels=16", "network.channels_per_head=8"])).eval()
        assert sum(getattr(m, "num_heads", 0) > 1 for m in net.modules()) >= 2  # several blocks with several heads
        for name, p in net.named_parameters():  # open the zero-initialised gains so that attention reaches the output
            if name.endswith("gain"):
                p.data.fill_(1)
        x, sigma = torch.randn(4, 1, 16, 16), torch.rand(4)
        outputs = []
        with torch.no_grad():
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
                with sdpa_kernel(backend):
                    outputs.append(net(x, sigma.log() / 4))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
        assert outputs[0].abs().mean() > 1e-2
