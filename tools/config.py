"""YAML configs: defaults, validation, `section.key=value` overrides, and building the network.

A config has a top-level `unet` (the network file, e.g. unetE.py) and the sections below. Every key
is checked against DEFAULTS (or, for `network`, against the UNet constructor's signature), so a typo
or a wrong type stops the run before anything is built.
"""

import copy
import importlib
import inspect
import math
import os
import sys

import yaml

from tools.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("data", "network", "diffusion", "train", "ema", "sample", "probe")

DEFAULTS = {
    "unet": "unetE.py",                 # Network file at the repository's top level: unetC.py, unetE.py, unetG.py.
    "data": {
        "dataset": "digits",            # digits | cifar10 | cifar100 | tinyimagenet | folder
        "root": "./data",               # Where real datasets live (nothing is downloaded; never written to).
        "cache": "./cache",             # Derived files shared by runs: decoded image folders, FID statistics, dataset classifiers.
        "xflip": False,                 # Random horizontal flips during training.
        "use_labels": False,            # Feed class labels to the network (needs network.label_dim).
    },
    "network": None,                    # Keys and defaults: the UNet constructor of the chosen file.
    "diffusion": {
        "sigma_data": 0.5,              # Std of the data (images in [-1, 1]).
        "P_mean": -1.2,                 # Mean of ln(sigma) during training.
        "P_std": 1.2,                   # Std of ln(sigma) during training.
        "loss_weighting": "uncertainty",  # uncertainty (learned, EDM2 eq. 21) | scaled (plain EDM).
        "logvar_channels": 128,         # Fourier features of the uncertainty head u(sigma).
    },
    "train": {
        "outdir": "runs/default",       # Run directory: checkpoints/, snapshots/, logs, samples.
        "seed": 0,                      # Seeds weights, data order, noise levels and noise.
        "epochs": 2000,                 # Training length in passes over the dataset.
        "batch_size": 512,              # Global batch, summed over ranks.
        "batch_gpu": 0,                 # Per-rank micro-batch; 0 = the whole per-rank batch (no accumulation).
        "lr": 2e-2,                     # Reference learning rate.
        "lr_rampup_epochs": 200.0,      # Linear warm-up length.
        "lr_ref_epochs": 400.0,         # t_ref of the inverse-sqrt decay; 0 = constant after warm-up.
        "betas": [0.9, 0.99],           # Adam betas (EDM2: beta2 = 0.99).
        "eps": 1e-8,                    # Adam eps.
        "precision": "bf16",            # bf16 | fp16 | fp32 autocast on GPU (CPU always runs fp32).
        "compile": False,               # torch.compile the network.
        "checkpoint_epochs": 50,        # Checkpoint cadence (and at the end).
        "checkpoint_minutes": 30.0,     # Also a resume checkpoint this often (minutes, mid-epoch too); 0 = only per epoch.
        "keep_checkpoints": 3,          # Checkpoints kept on disk (newest); 0 = all.
        "grid_epochs": 50,              # Cadence of the EMA sample grid in TensorBoard; 0 = never.
        "log_steps": 50,                # TensorBoard scalar cadence in optimizer steps.
        "max_nonfinite_steps": 100,     # Stop when the loss is non-finite this many steps in a row.
        "label_dropout": 0.0,           # Probability of dropping the class label (for classifier-free guidance).
        "eval_epochs": 0,               # Cadence of the evaluation (tools/evaluation.py: validation loss, quality curve); 0 = never.
        "eval_sigmas": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0],  # Noise levels of the validation loss (its total: their mean).
        "eval_images": 0,               # Held-out images of the validation loss, and as many training images; 0 = the whole split.
        "eval_samples": 0,              # Samples of the quality curve (seeds 0, 1, ...; KID, FD, P/R by the dataset classifier); 0 = none.
        "eval_inception": False,        # Also Inception FD/KID on the quality curve where local weights exist (FID_INCEPTION_WEIGHTS).
    },
    "ema": {
        "classic_halflife_kimg": 500.0, # Classic EMA (ema-pytorch) half-life in thousands of images.
        "classic_rampup_ratio": 0.05,   # Warm-up: half-life <= ratio * images seen; 0 = no warm-up.
        "sigma_rels": [0.05, 0.10],     # Power-function EMAs tracked during training (EDM2 section 3).
        "snapshot_epochs": 20.0,        # Cadence of power-function EMA snapshots for post-hoc reconstruction.
        "snapshot_dtype": "float32",    # float32 | float16 | bfloat16.
    },
    "sample": {
        "sampler": "heun",              # heun | euler | dpmpp2m
        "steps": 18,                    # Number of noise levels (heun: 2*steps - 1 evaluations).
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
        "S_churn": 0.0,                 # Stochasticity (EDM Alg. 2); 0 = deterministic.
        "S_min": 0.0,
        "S_max": math.inf,
        "S_noise": 1.0,
        "batch": 256,                   # Images per rank per forward.
        "num_images": 50000,            # Images for FID (seeds 0 .. num_images - 1).
        "ema": "classic",               # classic | online | sigma_rel=X
    },
    "probe": {
        "block": "",                    # Features: pooled output of this block (probe.py --list-blocks); '' = dec.<2nd-lowest res>_block1.
        "sigma": 0.06,                  # Noise level of the features (DDAE: --t 4 of the 18-step schedule, 0.0599).
        "ema": "classic",               # Weights probed: classic | online | sigma_rel=X.
        "classifier": "sklearn",        # sklearn (CPU) | torch (the same objective by L-BFGS on the GPU, for large sets).
        "C_grid": [0.001, 0.01, 0.1, 1.0, 10.0],  # Inverse L2 strengths tried (scikit-learn's C).
        "holdout": 0.1,                 # Fraction of the training split that chooses C (the test split chooses nothing).
        "xflip": False,                 # Add x-flipped training images' features.
        "grid_sigmas": [0.01, 0.03, 0.06, 0.15, 0.3, 0.6],  # Noise levels of probe.py --grid (with every block).
        "batch": 512,                   # Images per rank per forward during feature extraction.
    },
}

CHOICES = {
    ("data", "dataset"): ("digits", "cifar10", "cifar100", "tinyimagenet", "folder"),
    ("diffusion", "loss_weighting"): ("uncertainty", "scaled"),
    ("train", "precision"): ("bf16", "fp16", "fp32"),
    ("ema", "snapshot_dtype"): ("float32", "float16", "bfloat16"),
    ("sample", "sampler"): ("heun", "euler", "dpmpp2m"),
}

# Allowed values of numeric keys, checked after the types: out of range, a value is not refused where it is used
# but turns into garbage there (grey images, an empty loop, a crash after a full epoch), so it stops the run here.
# A rule is '> a', '>= a' or an interval '[a, b)'; a bound may name another key of the same section. For a list,
# 'each <rule>' applies to every entry and LENGTHS bounds the number of entries. Values must be finite except in
# UNBOUNDED. Keys absent from a section (a network file without them) are skipped.
RANGES = {
    ("network", "img_resolution"): ">= 1",      # and divisible by 2^(levels - 1): see _check_network
    ("network", "img_channels"): ">= 1",
    ("network", "label_dim"): ">= 0",
    ("network", "model_channels"): ">= 1",
    ("network", "channel_mult"): "each >= 1",
    ("network", "noise_channels"): ">= 1",      # or None (= model_channels)
    ("network", "emb_channels"): ">= 1",        # or None (= 4 * model_channels)
    ("network", "num_blocks"): ">= 0",
    ("network", "channels_per_head"): ">= 1",
    ("network", "dropout"): "[0, 1)",
    ("diffusion", "sigma_data"): "> 0",
    ("diffusion", "P_std"): "> 0",
    ("diffusion", "logvar_channels"): ">= 1",
    ("train", "epochs"): ">= 1",
    ("train", "batch_size"): ">= 1",
    ("train", "batch_gpu"): ">= 0",
    ("train", "lr"): "> 0",
    ("train", "lr_rampup_epochs"): ">= 0",
    ("train", "lr_ref_epochs"): ">= 0",
    ("train", "betas"): "each [0, 1)",
    ("train", "eps"): "> 0",
    ("train", "checkpoint_epochs"): ">= 1",
    ("train", "checkpoint_minutes"): ">= 0",
    ("train", "keep_checkpoints"): ">= 0",
    ("train", "grid_epochs"): ">= 0",
    ("train", "log_steps"): ">= 1",
    ("train", "max_nonfinite_steps"): ">= 1",
    ("train", "label_dropout"): "[0, 1)",
    ("train", "eval_epochs"): ">= 0",
    ("train", "eval_sigmas"): "each > 0",
    ("train", "eval_images"): ">= 0",
    ("train", "eval_samples"): ">= 0",        # and 0 or >= MIN_CURVE_SAMPLES: see validate
    ("ema", "classic_halflife_kimg"): "> 0",
    ("ema", "classic_rampup_ratio"): ">= 0",
    ("ema", "sigma_rels"): "each (0, 1/sqrt(12))",  # where power-function profiles exist (tools/posthoc.py SIGMA_REL_MAX)
    ("ema", "snapshot_epochs"): ">= 0",
    ("sample", "steps"): ">= 2",                # 1 jumps from sigma_max straight to 0: one denoiser call, the data mean
    ("sample", "sigma_min"): "> 0",
    ("sample", "sigma_max"): "> sigma_min",
    ("sample", "rho"): "> 0",
    ("sample", "S_churn"): ">= 0",
    ("sample", "S_min"): ">= 0",
    ("sample", "S_max"): ">= S_min",
    ("sample", "S_noise"): ">= 0",
    ("sample", "batch"): ">= 1",
    ("sample", "num_images"): ">= 1",
    ("probe", "sigma"): "> 0",
    ("probe", "C_grid"): "each > 0",
    ("probe", "holdout"): "[0, 1)",
    ("probe", "grid_sigmas"): "each > 0",
    ("probe", "batch"): ">= 1",
}
LENGTHS = {  # (fewest, most) entries of a list; None = no limit
    ("network", "channel_mult"): (1, None),
    ("train", "betas"): (2, 2),
    ("probe", "C_grid"): (1, None),
    ("train", "eval_sigmas"): (1, None),
    ("probe", "grid_sigmas"): (1, None),
}
MIN_CURVE_SAMPLES = 40  # train.eval_samples: the quality curve's 4 seed blocks (tools/evaluation.py) of >= 10 samples
UNBOUNDED = {("sample", "S_max")}  # .inf is meaningful here (churn at every noise level)
_NAMED_BOUNDS = {"1/sqrt(12)": 12 ** -0.5}


def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(type(v), type(v).__name__)


def _check_value(where, value, default):
    """Raise UserError unless `value` has the type of `default` (ints pass for floats, lists for tuples)."""
    if default is None:
        return value
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"{where} must be {_type_name(default)}, got {value!r}")
    return value


def _bound(text, values):
    """A rule's bound: another key of the section, a named constant or a number."""
    if text in values:
        return values[text]
    return _NAMED_BOUNDS[text] if text in _NAMED_BOUNDS else float(text)


def _satisfies(value, rule, values):
    """Whether the number `value` meets `rule` ('> a', '>= a', '[a, b)', ...); NaN meets none."""
    if rule.startswith(">"):
        op, bound = rule.split(" ", 1)
        bound = _bound(bound, values)
        return value >= bound if op == ">=" else value > bound
    lo, hi = (_bound(b.strip(), values) for b in rule[1:-1].split(","))
    return (value >= lo if rule[0] == "[" else value > lo) and (value <= hi if rule[-1] == "]" else value < hi)


def _describe(rule, section, values, names):
    """The rule as an error message says it: 'in [0, 1)', '>= 1', '> sample.sigma_min (0.002)'."""
    if not rule.startswith(">"):
        return f"in {rule}"
    op, bound = rule.split(" ", 1)
    if bound in values:
        return f"{op} {names.get(bound, f'{section}.{bound}')} ({values[bound]!r})"
    return rule


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_ranges(section, values, names=None):
    """Raise UserError unless every key of `values` (one section, types already checked) meets its RANGES rule.

    `names` maps keys to what the user typed, e.g. {'steps': '--steps'} for a command-line flag that replaced
    sample.steps; the message names `section.key` otherwise."""
    names = names or {}
    for (sec, key), rule in RANGES.items():
        if sec != section or values.get(key) is None:
            continue
        where, value = names.get(key, f"{section}.{key}"), values[key]
        if rule.startswith("each "):
            rule = rule[len("each "):]
            fewest, most = LENGTHS.get((section, key), (0, None))
            count = (f"{fewest} numbers" if fewest == most else "a non-empty list of numbers" if fewest else "a list of numbers")
            if (not isinstance(value, list) or not fewest <= len(value) <= (most or len(value))
                    or not all(_is_number(v) and math.isfinite(v) and _satisfies(v, rule, values) for v in value)):
                raise UserError(f"{where} must be {count}, each {_describe(rule, section, values, names)}, got {value!r}")
            continue
        if not _is_number(value):
            raise UserError(f"{where} must be a number, got {value!r}")
        if math.isinf(value) and (section, key) not in UNBOUNDED:
            raise UserError(f"{where} must be finite, got {value!r}")
        if not _satisfies(value, rule, values):
            raise UserError(f"{where} must be {_describe(rule, section, values, names)}, got {value!r}")


def _check_network(net):
    """What the UNet's skeleton needs beyond RANGES: whole numbers for sizes, and a resolution that halves evenly
    at every level (a 6x6 image with three levels would meet its 3x3 skip at 2x2), attention where a level is."""
    for key in ("img_resolution", "img_channels", "noise_channels", "emb_channels"):
        if net.get(key) is not None and not (isinstance(net[key], int) and not isinstance(net[key], bool)):
            raise UserError(f"network.{key} must be an integer, got {net[key]!r}")
    mult = net.get("channel_mult")
    if isinstance(mult, list) and not all(isinstance(m, int) and not isinstance(m, bool) for m in mult):
        raise UserError(f"network.channel_mult must be a list of integers, got {mult!r}")
    check_ranges("network", net)
    res = net.get("img_resolution")
    if mult and res:
        factor = 2 ** (len(mult) - 1)
        if res % factor:
            raise UserError(f"network.img_resolution must be divisible by 2^(len(channel_mult) - 1) = {factor} "
                            f"(halved at each of the {len(mult)} levels), got {res}")
        levels = [res >> level for level in range(len(mult))]
        attn = net.get("attn_resolutions")
        if isinstance(attn, list) and any(a not in levels for a in attn):
            raise UserError(f"network.attn_resolutions must be among the UNet's resolutions {levels}, got {attn!r}")


def network_defaults(unet_file):
    """The `network` keys a network file accepts, with their defaults (None where there is none)."""
    params = inspect.signature(load_unet_class(unet_file).__init__).parameters
    return {k: (None if p.default is inspect.Parameter.empty else p.default) for k, p in params.items() if k != "self"}


def load_unet_class(unet_file):
    # Only unet*.py files: any other module (unet: sample.py) would be imported, side effects and all, before failing.
    allowed = sorted(f for f in os.listdir(ROOT) if f.startswith("unet") and f.endswith(".py") and os.path.isfile(os.path.join(ROOT, f)))
    if unet_file not in allowed:
        raise UserError(f"unet: {unet_file!r} is not a network file; allowed: {', '.join(allowed)}")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    unet = getattr(importlib.import_module(unet_file[:-3]), "UNet", None)
    if not inspect.isclass(unet):
        raise UserError(f"unet: {unet_file} defines no UNet class; allowed: {', '.join(allowed)}")
    return unet


def _merge(cfg, overrides):
    """Apply `section.key=value` strings; values are parsed as YAML (2, 1e-3, true, [1, 2])."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"override {item!r} must look like section.key=value, e.g. train.epochs=2")
        key, text = item.split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if section not in SECTIONS:
            raise UserError(f"override {key}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        cfg.setdefault(section, {})
        if not isinstance(cfg[section], dict):
            raise UserError(f"section {section!r} must be a mapping")
        cfg[section][name] = value
    return cfg


def validate(raw):
    """Fill in defaults and check every key and type; returns the resolved config."""
    if not isinstance(raw, dict):
        raise UserError("a config must be a YAML mapping of sections")
    cfg = {"unet": raw.get("unet", DEFAULTS["unet"])}
    if not isinstance(cfg["unet"], str):
        raise UserError(f"unet must be a string such as unetE.py, got {cfg['unet']!r}")
    for key in raw:
        if key != "unet" and key not in SECTIONS:
            raise UserError(f"unknown top-level key {key!r}; allowed: unet, {', '.join(SECTIONS)}")
    for section in SECTIONS:
        defaults = network_defaults(cfg["unet"]) if section == "network" else DEFAULTS[section]
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise UserError(f"section {section!r} must be a mapping of keys to values")
        out = copy.deepcopy(defaults)
        for key, value in given.items():
            if key not in defaults:
                raise UserError(f"unknown key {section}.{key}; allowed: {', '.join(defaults)}")
            choices = CHOICES.get((section, key))
            if choices and value not in choices:
                raise UserError(f"{section}.{key} must be one of {', '.join(choices)}, got {value!r}")
            out[key] = _check_value(f"{section}.{key}", value, defaults[key])
        if section == "network":
            missing = [k for k, v in out.items() if v is None and k in ("img_resolution", "img_channels")]
            if missing:
                raise UserError(f"network.{missing[0]} is required")
            out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
            _check_network(out)
        else:
            check_ranges(section, out)
        if section == "train" and 0 < out["eval_samples"] < MIN_CURVE_SAMPLES:
            raise UserError(f"train.eval_samples must be 0 (no quality curve) or at least {MIN_CURVE_SAMPLES} "
                            f"(4 seed blocks of 10), got {out['eval_samples']}")
        cfg[section] = out
    return cfg


def load_config(path, overrides=()):
    """Read a YAML config, apply overrides, validate. Raises UserError with one readable line."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"config file {path!r} not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    return validate(_merge(raw, overrides))


def build_network(cfg):
    """UNet(**cfg['network']) from the config's network file."""
    return load_unet_class(cfg["unet"])(**cfg["network"])


def build_edm(cfg):
    """The trainable model: network wrapped in EDM preconditioning, plus the loss head."""
    from tools.edm import EDM
    d = cfg["diffusion"]
    return EDM(build_network(cfg), d["sigma_data"], d["P_mean"], d["P_std"], d["loss_weighting"], d["logvar_channels"])


def dump(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
