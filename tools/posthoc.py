"""Power-function EMA and post-hoc EMA reconstruction (EDM2 section 3).

A power-function EMA with exponent gamma averages the training trajectory theta(tau) with the profile
    p(tau) = (gamma + 1) / t^(gamma + 1) * tau^gamma  on [0, t],  t = training images seen,
whose relative width is sigma_rel = std(tau) / t. train.py tracks a few of these (sigma_rels, default
0.05 and 0.10) and snapshots them at regular image counts; any other (sigma_rel, t_out) is rebuilt as a
linear combination of the snapshots whose profiles best match the target profile in L2.

All times are in training images, never optimizer steps, so profiles do not depend on batch size or
GPU count.
"""

import os
import sys

import numpy as np
import torch

from tools.checkpoint import atomic_save, numbered_files, verify
from tools.cli import UserError

SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0: the uniform average over [0, t]
PROFILE_WARN_REL_ERR = 0.10  # reconstructions whose profile misses the target by more than this get a warning


def sigma_rel_to_gamma(sigma_rel):
    """gamma of the power-function profile with relative std sigma_rel: the largest real root of
    g^3 + 7 g^2 + (16 - sigma_rel^-2) g + (12 - sigma_rel^-2) = 0 (EDM2 Algorithm 2)."""
    sigma_rel = float(sigma_rel)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise UserError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}) (1/sqrt(12)), got {sigma_rel:g}")
    s2 = sigma_rel ** -2
    # The cubic has three real roots, in (-inf, -1), (-1, 0) and (0, inf); the positive one is wanted.
    return float(np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2]).real.max())


def gamma_to_sigma_rel(gamma):
    """Relative std of the power-function profile: sqrt((g + 1) / ((g + 2)^2 (g + 3)))."""
    gamma = float(gamma)
    if not gamma > -1:
        raise UserError(f"gamma must be > -1 for a power-function EMA profile, got {gamma:g}")
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


def power_ema_beta(t_img, batch_img, gamma):
    """Per-step decay (1 - dt/t)^(gamma + 1), t = images seen after the step, dt = its batch.

    The step's images get weight 1 - beta; the first step (t == dt) gives beta = 0. Because
    beta = (t_prev / t)^(gamma + 1), the weights telescope: the step covering images (t_prev, t] ends up
    with exactly the integral of p over (t_prev, t], for any batch schedule.
    """
    return max(0.0, 1.0 - batch_img / t_img) ** (gamma + 1)


def profile_inner(t_a, g_a, t_b, g_b):
    """<p_a, p_b> = integral of the two power-function profiles' product (EDM2 Algorithm 3):
    (g_a+1)(g_b+1) / ((g_a+g_b+1) max(t_a, t_b)) * (t_a/t_b)^(g_b if t_a < t_b else -g_a).
    Broadcasts over numpy arrays; the power term is <= 1, so it cannot overflow."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    ratio_pow = (t_a / t_b) ** np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio_pow


def solve_coefficients(t_i, g_i, t_out, g_out):
    """Coefficients x (float64, one per snapshot) such that sum_i x_i p_i approximates the target profile
    (t_out, g_out) in L2; snapshots with t_i > t_out get 0 and the rest sum to 1.

    Differences from ema_pytorch's post_hoc_ema.solve_weights / PostHocEMA.synthesize_ema_model, and why:
    - Only snapshots with t_i <= t_out are used. ema_pytorch fits with every checkpoint, so a
      reconstruction at an earlier time would include weights trained after it (and change as training
      goes on); the target profile is zero after t_out, and so is every profile used here.
    - Least squares (SVD, minimum norm) instead of torch.linalg.solve: A is the Gram matrix of nearly
      collinear profiles (neighbouring snapshots, similar gammas), badly conditioned with many
      snapshots and singular if a (t, gamma) pair repeats, where an exact solve fails or amplifies noise.
    - x is normalised to sum 1. Each profile integrates to 1, so the fitted profile integrates to
      sum x_i, which least squares makes 1 only up to the fit error; forcing it keeps the reconstruction
      an average (a constant parameter comes back exactly, weight norms are not scaled).
    - Times are training images, not optimizer steps (a batch-size change does not move profiles), and
      are divided by t_out before solving: A and B scale as 1/t, so x is unchanged and the numbers
      stay O(1).
    """
    t_i, g_i = np.asarray(t_i, dtype=np.float64).ravel(), np.asarray(g_i, dtype=np.float64).ravel()
    if t_i.shape != g_i.shape:
        raise ValueError(f"t_i and g_i differ in length ({t_i.size} vs {g_i.size})")
    x = np.zeros(t_i.size)
    used = t_i <= t_out
    if not used.any():
        raise UserError(f"no snapshot at or before t_out={t_out} (first at {int(t_i.min()) if t_i.size else 'none'})")
    t, g = t_i[used] / t_out, g_i[used]
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    B = profile_inner(t, g, 1.0, g_out)
    x_used = np.linalg.lstsq(A, B, rcond=None)[0]
    total = x_used.sum()
    if not abs(total) > 1e-6:
        raise UserError(f"post-hoc EMA fit at t_out={t_out} is degenerate (coefficients sum to {total:.3g})")
    x[used] = x_used / total
    return x


def profile_rel_error(t_i, g_i, x, t_out, g_out):
    """||sum_i x_i p_i - p_target|| / ||p_target|| in L2, in closed form from the inner products."""
    t_i, g_i, x = (np.asarray(v, dtype=np.float64).ravel() for v in (t_i, g_i, x))
    t = t_i / t_out
    A = profile_inner(t[:, None], g_i[:, None], t[None, :], g_i[None, :])
    B = profile_inner(t, g_i, 1.0, g_out)
    target_sq = profile_inner(1.0, g_out, 1.0, g_out)
    err_sq = x @ A @ x - 2 * x @ B + target_sq
    return float(np.sqrt(max(err_sq, 0.0) / target_sq))


def list_snapshots(snapshot_dir):
    """[(t_img, path)] of snapshot_<t_img>.pt files, sorted by t_img; [] if the folder does not exist."""
    return numbered_files(snapshot_dir, "snapshot_", ".pt")


def _load_snapshot(path, mmap=False, checksum=True):
    """A snapshot dict, checked against its checksum manifest and for the fields reconstruction needs;
    UserError naming the file otherwise.

    checksum=False (reconstruct's metadata pass, mmap=True) skips the checksum, which reads the whole file:
    the weights pass checks every file before its weights are used, and a file that fails a check here is
    checksummed first, so that a corrupt one is reported as such."""
    if checksum:
        verify(path, "snapshot")
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle error, unexpected types: all mean "not a usable snapshot"
        verify(path, "snapshot")
        raise UserError(f"snapshot {path} is unreadable ({type(e).__name__}); delete it and run again") from None
    if not (isinstance(snap, dict) and "t_img" in snap and isinstance(snap.get("emas"), list)
            and all(isinstance(e, dict) and {"sigma_rel", "gamma", "net"} <= e.keys() for e in snap["emas"])):
        verify(path, "snapshot")
        raise UserError(f"snapshot {path} lacks t_img or emas[sigma_rel, gamma, net]; delete it and run again")
    return snap


def _snapshots_or_error(snapshot_dir):
    snapshots = list_snapshots(snapshot_dir)
    if not snapshots:
        what = "is empty" if os.path.isdir(snapshot_dir) else "does not exist"
        raise UserError(f"snapshot folder {snapshot_dir} {what}; train with ema.sigma_rels set and ema.snapshot_epochs > 0")
    return snapshots


def reconstruct(snapshot_dir, sigma_rel, t_out=None):
    """Post-hoc EMA at (sigma_rel, t_out) from the snapshots in snapshot_dir (t_out: images; default: newest).

    Returns (state_dict, info): float tensors are sum_i x_i theta_i accumulated in float32, other
    tensors (integer buffers) come from the newest snapshot used. Snapshots are read one at a time.
    info: sigma_rel, gamma, t_out, num_snapshots (files used), coefficients (one dict per stored EMA
    used: t_img, sigma_rel, gamma, coef) and profile_rel_err (L2 misfit of the reconstructed profile).
    """
    gamma_out = sigma_rel_to_gamma(sigma_rel)
    snapshots = _snapshots_or_error(snapshot_dir)
    t_out = snapshots[-1][0] if t_out is None else int(t_out)
    used = [(t, p) for t, p in snapshots if t <= t_out]
    if not used:
        raise UserError(f"t_out={t_out} images precedes the first snapshot ({snapshots[0][0]}) in {snapshot_dir}")

    # First pass: the (t, gamma) of every stored EMA. mmap reads the metadata without the weights.
    entries = []  # (file index, ema index, t_img, sigma_rel, gamma)
    for f, (t_name, path) in enumerate(used):
        snap = _load_snapshot(path, mmap=True, checksum=False)
        if int(snap["t_img"]) != t_name:
            verify(path, "snapshot")
            raise UserError(f"snapshot {path} holds t_img={snap['t_img']}, not the {t_name} in its name; rename or delete it")
        entries += [(f, j, t_name, float(e["sigma_rel"]), float(e["gamma"])) for j, e in enumerate(snap["emas"])]
        del snap
    t_i = np.array([e[2] for e in entries], dtype=np.float64)
    g_i = np.array([e[4] for e in entries], dtype=np.float64)
    x = solve_coefficients(t_i, g_i, t_out, gamma_out)

    # Second pass: accumulate sum_i x_i theta_i in float32, one snapshot in memory at a time.
    coef = {(e[0], e[1]): float(c) for e, c in zip(entries, x)}
    state, ref_path = None, None
    for f, (_, path) in enumerate(used):
        snap = _load_snapshot(path)
        for j, e in enumerate(snap["emas"]):
            net = e["net"]
            if state is None:
                state = {k: torch.zeros(v.shape, dtype=torch.float32) if v.is_floating_point() else v.clone()
                         for k, v in net.items()}
                ref_path = path
            if net.keys() != state.keys() or any(v.shape != state[k].shape for k, v in net.items()):
                raise UserError(f"snapshot {path} holds a different network than {ref_path}; "
                                f"keep one run's snapshots per folder")
            for k, v in net.items():
                if v.is_floating_point():
                    state[k].add_(v.float(), alpha=coef[f, j])
                elif j == 0:
                    state[k] = v.clone()  # the newest used snapshot's value wins
        del snap

    err = profile_rel_error(t_i, g_i, x, t_out, gamma_out)
    if err > PROFILE_WARN_REL_ERR:
        print(f"warning: post-hoc EMA sigma_rel={sigma_rel:g} at t_out={t_out} matches its target profile only to "
              f"{100 * err:.0f}% (L2); snapshots used end at {used[-1][0]} images", file=sys.stderr)
    info = dict(sigma_rel=float(sigma_rel), gamma=gamma_out, t_out=t_out, num_snapshots=len(used),
                coefficients=[dict(t_img=e[2], sigma_rel=e[3], gamma=e[4], coef=float(c)) for e, c in zip(entries, x)],
                profile_rel_err=err)
    return state, info


def posthoc_path(outdir, sigma_rel, t_out):
    return os.path.join(outdir, "posthoc", f"sigma_rel-{sigma_rel:.4f}-{int(t_out):012d}.pt")


def write_reconstruction(outdir, sigma_rel, t_out=None):
    """OUTDIR/posthoc/sigma_rel-<sigma_rel>-<t_out>.pt with {net, sigma_rel, t_img, coefficients}, written
    atomically; an existing file is reused unless a snapshot it was built from is newer (a rerun
    overwrote it). Returns the path."""
    snapshot_dir = os.path.join(outdir, "snapshots")
    sigma_rel_to_gamma(sigma_rel)  # validate before touching files
    snapshots = _snapshots_or_error(snapshot_dir)
    t_out = snapshots[-1][0] if t_out is None else int(t_out)
    path = posthoc_path(outdir, sigma_rel, t_out)
    if os.path.exists(path):
        built = os.stat(path).st_mtime_ns
        if all(os.stat(p).st_mtime_ns <= built for t, p in snapshots if t <= t_out):
            try:
                verify(path, "post-hoc EMA", advice="building it again")
                return path
            except UserError as e:
                print(f"warning: {e}", file=sys.stderr)
    state, info = reconstruct(snapshot_dir, sigma_rel, t_out)
    atomic_save({"net": state, "sigma_rel": float(sigma_rel), "t_img": t_out, "coefficients": info["coefficients"],
                 "profile_rel_err": info["profile_rel_err"]}, path)
    return path
