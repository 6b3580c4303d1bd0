"""Power-function EMA profiles and post-hoc EMA reconstruction from snapshots (EDM2 section 3; docs/DESIGN.md)."""

import os
import sys

import numpy as np
import torch

from tools.checkpoint import atomic_save, numbered_files, verify
from tools.cli import UserError

SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0: the uniform average over [0, t]
PROFILE_WARN_REL_ERR = 0.10  # L2 misfit of a profile that gets a warning


def sigma_rel_to_gamma(sigma_rel):
    """The largest real root of g^3 + 7 g^2 + (16 - sigma_rel^-2) g + (12 - sigma_rel^-2) (EDM2 Algorithm 2)."""
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise UserError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}) (1/sqrt(12)), got {sigma_rel:g}")
    s2 = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2]).real.max())


def power_ema_beta(t_img, batch_img, gamma):
    """(1 - dt/t)^(gamma + 1), t = images seen after the step, dt = its batch: exact for any batch schedule."""
    return max(0.0, 1.0 - batch_img / t_img) ** (gamma + 1)


def profile_inner(t_a, g_a, t_b, g_b):
    """<p_a, p_b> of two power-function profiles (EDM2 Algorithm 3), broadcast over numpy arrays."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    ratio_pow = (t_a / t_b) ** np.where(t_a < t_b, g_b, -g_a)  # <= 1: cannot overflow
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio_pow


def _gram(t, g, g_out):  # the Gram matrix and the inner products with the target at t = 1 (times / t_out)
    return profile_inner(t[:, None], g[:, None], t[None, :], g[None, :]), profile_inner(t, g, 1.0, g_out)


def solve_coefficients(t_i, g_i, t_out, g_out):
    """One coefficient per snapshot: 0 after t_out, else the minimum-norm L2 fit of the target, summing to 1."""
    t_i, g_i = np.asarray(t_i, dtype=np.float64).ravel(), np.asarray(g_i, dtype=np.float64).ravel()
    x, used = np.zeros(t_i.size), t_i <= t_out
    if not used.any():
        raise UserError(f"no snapshot at or before t_out={t_out} (first at {int(t_i.min()) if t_i.size else 'none'})")
    x_used = np.linalg.lstsq(*_gram(t_i[used] / t_out, g_i[used], g_out), rcond=None)[0]
    total = x_used.sum()
    if not abs(total) > 1e-6:
        raise UserError(f"post-hoc EMA fit at t_out={t_out} is degenerate (coefficients sum to {total:.3g})")
    x[used] = x_used / total
    return x


def profile_rel_error(t_i, g_i, x, t_out, g_out):
    """||sum_i x_i p_i - p_target|| / ||p_target|| in L2, in closed form."""
    t_i, g_i, x = (np.asarray(v, dtype=np.float64).ravel() for v in (t_i, g_i, x))
    A, B = _gram(t_i / t_out, g_i, g_out)
    target_sq = profile_inner(1.0, g_out, 1.0, g_out)
    return float(np.sqrt(max(x @ A @ x - 2 * x @ B + target_sq, 0.0) / target_sq))


def list_snapshots(snapshot_dir):
    return numbered_files(snapshot_dir, "snapshot_", ".pt")


def _load_snapshot(path, mmap=False, checksum=True):
    """A snapshot with the fields reconstruction needs; a failing file is checksummed, to name corruption."""
    if checksum:
        verify(path, "snapshot")
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        valid = isinstance(snap, dict) and "t_img" in snap and isinstance(snap.get("emas"), list) and all(
            isinstance(e, dict) and {"sigma_rel", "gamma", "net"} <= e.keys() for e in snap["emas"])
        problem = None if valid else "lacks t_img or emas[sigma_rel, gamma, net]"
    except Exception as e:
        problem = f"is unreadable ({type(e).__name__})"
    if problem:
        verify(path, "snapshot")
        raise UserError(f"snapshot {path} {problem}; delete it and run again")
    return snap


def _snapshots_and_t_out(snapshot_dir, t_out):  # t_out None: the newest snapshot's
    if not (snapshots := list_snapshots(snapshot_dir)):
        what = "is empty" if os.path.isdir(snapshot_dir) else "does not exist"
        raise UserError(f"snapshot folder {snapshot_dir} {what}; train with ema.sigma_rels set and ema.snapshot_epochs > 0")
    return snapshots, snapshots[-1][0] if t_out is None else int(t_out)


def reconstruct(snapshot_dir, sigma_rel, t_out=None):
    """(state_dict, info) of the post-hoc EMA at sigma_rel, t_out images (default: the newest); a snapshot at a time."""
    gamma_out = sigma_rel_to_gamma(sigma_rel)
    snapshots, t_out = _snapshots_and_t_out(snapshot_dir, t_out)
    used = [(t, p) for t, p in snapshots if t <= t_out]
    if not used:
        raise UserError(f"t_out={t_out} images precedes the first snapshot ({snapshots[0][0]}) in {snapshot_dir}")

    entries = []  # (file, ema, t_img, sigma_rel, gamma), read through mmap
    for f, (t_name, path) in enumerate(used):
        snap = _load_snapshot(path, mmap=True, checksum=False)
        if int(snap["t_img"]) != t_name:
            verify(path, "snapshot")
            raise UserError(f"snapshot {path} holds t_img={snap['t_img']}, not the {t_name} in its name; rename or delete it")
        entries += [(f, j, t_name, float(e["sigma_rel"]), float(e["gamma"])) for j, e in enumerate(snap["emas"])]
    t_i, g_i = np.array([e[2] for e in entries], dtype=np.float64), np.array([e[4] for e in entries], dtype=np.float64)
    x = solve_coefficients(t_i, g_i, t_out, gamma_out)

    coef = {(e[0], e[1]): float(c) for e, c in zip(entries, x)}
    state = None
    for f, (_, path) in enumerate(used):
        for j, e in enumerate(_load_snapshot(path)["emas"]):
            net = e["net"]
            if state is None:
                state = {k: torch.zeros(v.shape, dtype=torch.float32) if v.is_floating_point() else v.clone() for k, v in net.items()}
            if net.keys() != state.keys() or any(v.shape != state[k].shape for k, v in net.items()):
                raise UserError(f"snapshot {path} holds a different network than {used[0][1]}; keep one run's snapshots per folder")
            for k, v in net.items():
                if v.is_floating_point():
                    state[k].add_(v.float(), alpha=coef[f, j])
                elif j == 0:
                    state[k] = v.clone()

    err = profile_rel_error(t_i, g_i, x, t_out, gamma_out)
    if err > PROFILE_WARN_REL_ERR:
        print(f"warning: post-hoc EMA sigma_rel={sigma_rel:g} at t_out={t_out} matches its target profile only to "
              f"{100 * err:.0f}% (L2); snapshots used end at {used[-1][0]} images", file=sys.stderr)
    info = dict(sigma_rel=float(sigma_rel), gamma=gamma_out, t_out=t_out, num_snapshots=len(used),
                coefficients=[dict(t_img=e[2], sigma_rel=e[3], gamma=e[4], coef=float(c)) for e, c in zip(entries, x)],
                profile_rel_err=err)
    return state, info


def write_reconstruction(outdir, sigma_rel, t_out=None):
    """OUTDIR/posthoc/sigma_rel-<sigma_rel>-<t_out>.pt, reused until a snapshot it was built from changes."""
    sigma_rel_to_gamma(sigma_rel)  # validates
    snapshots, t_out = _snapshots_and_t_out(os.path.join(outdir, "snapshots"), t_out)
    path = os.path.join(outdir, "posthoc", f"sigma_rel-{sigma_rel:.4f}-{t_out:012d}.pt")
    if os.path.exists(path) and all(os.stat(p).st_mtime_ns <= os.stat(path).st_mtime_ns for t, p in snapshots if t <= t_out):
        try:
            verify(path, "post-hoc EMA", advice="building it again")
            return path
        except UserError as e:
            print(f"warning: {e}", file=sys.stderr)
    state, info = reconstruct(os.path.join(outdir, "snapshots"), sigma_rel, t_out)
    atomic_save({"net": state, "sigma_rel": float(sigma_rel), "t_img": t_out, "coefficients": info["coefficients"],
                 "profile_rel_err": info["profile_rel_err"]}, path)
    return path
