"""The classic and the power-function EMAs of the weights, functions of the images seen (docs/DESIGN.md)."""

import os

import torch
from ema_pytorch import EMA

from tools.checkpoint import atomic_save
from tools.posthoc import power_ema_beta, sigma_rel_to_gamma

SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16")  # ema.snapshot_dtype


def classic_ema_beta(t_img, batch_img, halflife_img, rampup_ratio):
    """Per-step decay with the half-life min(halflife_img, rampup_ratio * t_img); t_img = images seen after the step."""
    if rampup_ratio > 0:
        halflife_img = min(halflife_img, rampup_ratio * t_img)
    return 0.5 ** (batch_img / max(halflife_img, 1e-8))


def _ema(net):
    return EMA(net, include_online_model=False, use_foreach=True, update_every=1)


class EMAs:
    def __init__(self, net, ema_cfg):
        self.halflife_img = ema_cfg["classic_halflife_kimg"] * 1000
        self.rampup_ratio = ema_cfg["classic_rampup_ratio"]
        self.sigma_rels = list(ema_cfg["sigma_rels"])
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.snapshot_dtype = getattr(torch, ema_cfg["snapshot_dtype"])
        self.classic = _ema(net)
        self.power = [_ema(net) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net, t_img, batch_img):
        """After the optimizer step that brought the images seen to t_img."""
        beta = classic_ema_beta(t_img, batch_img, self.halflife_img, self.rampup_ratio)
        self.classic.update_moving_average(self.classic.ema_model, net, current_decay=beta)
        for ema, gamma in zip(self.power, self.gammas):
            ema.update_moving_average(ema.ema_model, net, current_decay=power_ema_beta(t_img, batch_img, gamma))

    def state_dict(self):
        return {"classic": self.classic.ema_model.state_dict(), "power": [e.ema_model.state_dict() for e in self.power]}

    def load_state_dict(self, state):
        self.classic.ema_model.load_state_dict(state["classic"])
        for ema, s in zip(self.power, state["power"]):
            ema.ema_model.load_state_dict(s)

    def save_snapshot(self, outdir, t_img):
        """snapshots/snapshot_<t_img>.pt with every power EMA, for post-hoc reconstruction."""
        cast = lambda v: v.detach().to("cpu", self.snapshot_dtype if v.is_floating_point() else v.dtype)
        emas = [{"sigma_rel": s, "gamma": g, "net": {k: cast(v) for k, v in e.ema_model.state_dict().items()}}
                for s, g, e in zip(self.sigma_rels, self.gammas, self.power)]
        atomic_save({"t_img": int(t_img), "emas": emas}, os.path.join(outdir, "snapshots", f"snapshot_{int(t_img):012d}.pt"))
