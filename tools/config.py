"""YAML configs: every key declared once (SCHEMA), `section.key=value` overrides, validation, building the network."""

import copy
import functools
import importlib
import inspect
import math
import os

import torch
import yaml

from tools.augment import AUGMENT_DIM, EDM_XFLIP, GATED, STRENGTH_RANGES, STRENGTHS, Augment, is_on
from tools.cli import UserError
from tools.data import DATASETS
from tools.layers import number_dropout_layers
from tools.edm import EDM, LOSSES, EDMLoss
from tools.ema import SNAPSHOT_DTYPES
from tools.linear_probe import CLASSIFIERS
from tools.precision import PRECISIONS
from tools.sampler import PARAMS, SAMPLERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_CURVE_SAMPLES = 40  # train.eval_samples: the quality curve's 4 seed blocks (tools/evaluation.py) of >= 10 samples


# ----------------------------------------------------------------------------------------------------
# Allowed values.

class Range:
    """Numbers from `lo` to `hi` (None = unbounded), each bound a number, another key of the section, or (value, text)."""

    def __init__(self, lo=None, hi=None, lo_open=False, hi_open=True):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def holds(self, x, values):
        lo, hi = (values[b] if isinstance(b, str) else b[0] if isinstance(b, tuple) else b for b in (self.lo, self.hi))
        return ((lo is None or (x > lo if self.lo_open else x >= lo))
                and (hi is None or (x < hi if self.hi_open else x <= hi)))

    def describe(self, section, values, names):
        """The range as an error message says it: 'in [0, 1)', '>= 1', '> sample.sigma_min (0.002)'."""
        def text(bound):
            if isinstance(bound, str):
                return f"{names.get(bound, f'{section}.{bound}')} ({values[bound]!r})"
            return bound[1] if isinstance(bound, tuple) else f"{bound:g}"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {text(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{text(self.lo)}, {text(self.hi)}{')' if self.hi_open else ']'}"


class Key:
    """One config key: default (its type too), meaning, allowed values (`choices`, `range`, or `each` and `length` of a list)."""

    def __init__(self, default=None, meaning="", choices=None, range=None, each=None, length=(0, None), infinite_ok=False):
        self.default, self.meaning, self.choices = default, meaning, choices
        self.range, self.each, self.length, self.infinite_ok = range, each, length, infinite_ok


at_least, above = Range, functools.partial(Range, lo_open=True)
UNIT = Range(0, 1)                               # [0, 1)
SIGMA_REL = Range(0, (12 ** -0.5, "1/sqrt(12)"), lo_open=True)  # where power-function profiles exist (tools/posthoc.py)

SCHEMA = {
    "data": {
        "dataset": Key("digits", "Dataset: " + " | ".join(DATASETS) + ".", choices=DATASETS),
        "root": Key("./data", "Where real datasets live (nothing is downloaded; never written to)."),
        "cache": Key("./cache", "Derived files shared by runs: decoded image folders, FID statistics, dataset classifiers."),
        "xflip": Key(False, "Leaky x-flips: half the training images mirrored, the network not told (augment.xflip: non-leaky)."),
        "use_labels": Key(False, "Feed class labels to the network (needs network.label_dim)."),
        "max_images": Key(0, "Train on the first N training images (0 = all); the held-out split stays whole.", range=at_least(0)),
    },
    "augment": {
        "p": Key(0.0, "Probability of each transform per image (non-leaky: the network is told); 0 = none.", range=Range(0, 1, hi_open=False)),
        "xflip": Key(0.0, f"Probability of the non-leaky x-flip (EDM: {EDM_XFLIP:g}, half the images); 0 = none.", range=Range(0, 1, hi_open=False)),
        "transforms": Key(list(GATED), "Transforms applied with probability p each (tools/augment.py): " + ", ".join(GATED) + "."),
        **{k: Key(STRENGTHS[k], meaning, range=Range(*STRENGTH_RANGES[k], hi_open=False)) for k, meaning in (
            ("translate_int_max", "Integer translation up to this fraction of the image size."),
            ("scale_iso_std", "Std of log2 of the isotropic scale."),
            ("rotate_max", "Rotation uniform in +-rotate_max * pi (1 = the full circle)."),
            ("scale_aniso_std", "Std of log2 of the anisotropic stretch (along a random axis)."),
            ("translate_frac_std", "Std of the fractional translation, as a fraction of the image size."))},
    },
    "train": {
        "outdir": Key("runs/default", "Run directory: checkpoints/, snapshots/, logs, samples."),
        "seed": Key(0, "Seeds weights, data order, noise levels, noise, dropout masks and augmentation."),
        "epochs": Key(2000, "Training length in passes over the dataset.", range=at_least(1)),
        "batch_size": Key(512, "Global batch, summed over ranks.", range=at_least(1)),
        "batch_gpu": Key(0, "Per-rank micro-batch; 0 = the whole per-rank batch (no accumulation).", range=at_least(0)),
        "lr": Key(2e-2, "Reference learning rate.", range=above(0)),
        "lr_rampup_epochs": Key(200.0, "Linear warm-up length.", range=at_least(0)),
        "lr_ref_epochs": Key(400.0, "t_ref of the inverse-sqrt decay; 0 = constant after warm-up.", range=at_least(0)),
        "betas": Key([0.9, 0.99], "Adam betas (EDM2: beta2 = 0.99).", each=UNIT, length=(2, 2)),
        "eps": Key(1e-8, "Adam eps.", range=above(0)),
        "precision": Key("bf16", "Numerics of training (tools/precision.py; fp32 is fastest on CPUs): " + " | ".join(PRECISIONS) + ".",
                         choices=PRECISIONS),
        "compile": Key(False, "torch.compile the network."),
        "deterministic": Key(False, "Deterministic GPU kernels: the same bits from a run and its resume on the same GPU and software; slower."),
        "gns": Key(True, "Log the gradient noise scale B_simple (tools/gns.py; needs train.batch_gpu < batch_size or 2+ ranks)."),
        "checkpoint_epochs": Key(50, "Checkpoint cadence (and at the end).", range=at_least(1)),
        "checkpoint_minutes": Key(30.0, "Also a resume checkpoint this often (mid-epoch too); 0 = only per epoch.", range=at_least(0)),
        "keep_checkpoints": Key(3, "Checkpoints kept on disk (newest); 0 = all.", range=at_least(0)),
        "grid_epochs": Key(50, "Cadence of the EMA sample grid (TensorBoard and grids/); 0 = never.", range=at_least(0)),
        "log_steps": Key(50, "TensorBoard and metrics.jsonl cadence in optimizer steps.", range=at_least(1)),
        "max_nonfinite_steps": Key(100, "Stop when the gradients are non-finite this many steps in a row.", range=at_least(1)),
        "label_dropout": Key(0.0, "Probability of dropping the class label (for classifier-free guidance).", range=UNIT),
        "eval_epochs": Key(0, "Cadence of the evaluation (validation loss, quality curve); 0 = never.", range=at_least(0)),
        "eval_sigmas": Key([0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "Noise levels of the validation loss (its total: their mean).",
                           each=above(0), length=(1, None)),
        "eval_images": Key(0, "Held-out images of the validation loss, as many training images; 0 = the whole split.", range=at_least(0)),
        "eval_samples": Key(0, f"Samples of the quality curve (KID, FD, P/R); 0 = none, else >= {MIN_CURVE_SAMPLES}.", range=at_least(0)),
        "eval_inception": Key(False, "Also Inception FD/KID on the quality curve where local weights exist (FID_INCEPTION_WEIGHTS)."),
    },
    "ema": {
        "classic_halflife_kimg": Key(500.0, "Classic EMA (ema-pytorch) half-life in thousands of images.", range=above(0)),
        "classic_rampup_ratio": Key(0.05, "Warm-up: half-life <= ratio * images seen; 0 = no warm-up.", range=at_least(0)),
        "sigma_rels": Key([0.05, 0.10], "Power-function EMAs tracked during training (EDM2 section 3).", each=SIGMA_REL),
        "snapshot_epochs": Key(20.0, "Cadence of power-function EMA snapshots for post-hoc EMA; 0 = none.", range=at_least(0)),
        "snapshot_dtype": Key("float32", "Snapshot precision: " + " | ".join(SNAPSHOT_DTYPES) + ".", choices=SNAPSHOT_DTYPES),
    },
    "sample": {
        "sampler": Key("heun", "Sampler (sample.py --sampler list): " + " | ".join(SAMPLERS) + ".", choices=tuple(SAMPLERS)),
        "steps": Key(18, "Number of noise levels (heun: 2*steps - 1 evaluations); 1 would jump from sigma_max to 0.", range=at_least(2)),
        "sigma_min": Key(0.002, "Lowest noise level of the schedule.", range=above(0)),
        "sigma_max": Key(80.0, "Highest noise level of the schedule.", range=above("sigma_min")),
        "rho": Key(7.0, "Schedule exponent (EDM eq. 5).", range=above(0)),
        **{k: Key(default, meaning, range=Range(lo, lo_open=lo_open), infinite_ok=math.isinf(default))
           for k, (default, lo, lo_open, meaning) in PARAMS.items()},  # what the samplers read (tools/sampler.py)
        "precision": Key("bf16", "Numerics of sampling (part of a sample folder's name): " + " | ".join(PRECISIONS) + ".", choices=PRECISIONS),
        "batch": Key(256, "Images per rank per forward.", range=at_least(1)),
        "num_images": Key(50000, "Images for FID (seeds 0 .. num_images - 1).", range=at_least(1)),
        "ema": Key("classic", "Weights sampled: classic | online | sigma_rel=X."),
    },
    "probe": {
        "block": Key("", "Features: pooled output of this block (probe.py --list-blocks); '' = dec.<2nd-lowest res>_block1."),
        "sigma": Key(0.06, "Noise level of the features (DDAE: --t 4 of the 18-step schedule, 0.0599).", range=above(0)),
        "ema": Key("classic", "Weights probed: classic | online | sigma_rel=X."),
        "classifier": Key("sklearn", "sklearn (CPU) | torch (the same objective by L-BFGS on the GPU).", choices=CLASSIFIERS),
        "C_grid": Key([0.001, 0.01, 0.1, 1.0, 10.0], "Inverse L2 strengths tried (scikit-learn's C).", each=above(0), length=(1, None)),
        "holdout": Key(0.1, "Fraction of the training split that chooses C (the test split chooses nothing).", range=UNIT),
        "xflip": Key(False, "Add x-flipped training images' features."),
        "grid_sigmas": Key([0.01, 0.03, 0.06, 0.15, 0.3, 0.6], "Noise levels of probe.py --grid.", each=above(0), length=(1, None)),
        "precision": Key("bf16", "Numerics of feature extraction: " + " | ".join(PRECISIONS) + ".", choices=PRECISIONS),
        "batch": Key(512, "Images per rank per forward during feature extraction.", range=at_least(1)),
    },
}

# The network section: the UNet constructor's arguments and defaults (commented there); these are their ranges.
NETWORK_KEYS = {
    "img_resolution": Key(range=at_least(1)),
    "img_channels": Key(range=at_least(1)),
    "label_dim": Key(range=at_least(0)),
    "model_channels": Key(range=at_least(1)),
    "channel_mult": Key(each=at_least(1), length=(1, None)),
    "noise_channels": Key(range=at_least(1)),    # or None (= model_channels)
    "emb_channels": Key(range=at_least(1)),      # or None (= 4 * model_channels)
    "augment_dim": Key(range=at_least(0)),       # follows augment.p (_check_augment)
    "num_blocks": Key(range=at_least(0)),
    "channels_per_head": Key(range=at_least(1)),
    "dropout": Key(range=UNIT),
}
INTEGER_NETWORK_KEYS = ("img_resolution", "img_channels", "noise_channels", "emb_channels", "augment_dim")
# The diffusion section: the `loss:` class's constructor arguments (tools/edm.py LOSSES); the ranges of EDMLoss's.
LOSS_KEYS = {
    "sigma_data": Key(range=above(0)),
    "P_mean": Key(),
    "P_std": Key(range=above(0)),
    "loss_weighting": Key(choices=EDMLoss.WEIGHTINGS),
    "logvar_channels": Key(range=at_least(1)),
}
SECTIONS = ("data", "network", "diffusion", "augment", "train", "ema", "sample", "probe")
DEFAULTS = {"unet": "unetE.py", "loss": "EDMLoss", **{s: {k: key.default for k, key in keys.items()} for s, keys in SCHEMA.items()}}


# ----------------------------------------------------------------------------------------------------
# Checks.

def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(type(v), type(v).__name__)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_type(where, value, default):
    """`value` with the type of `default` (ints pass for floats); UserError otherwise."""
    if isinstance(default, float) and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        ok = default is None or isinstance(value, type(default))
    else:
        ok = _is_number(value) and (isinstance(default, float) or isinstance(value, int))
    if not ok:
        raise UserError(f"{where} must be {_type_name(default)}, got {value!r}")
    return float(value) if isinstance(default, float) else value


def _check_value(key, where, value, section, values, names):
    if key.choices is not None and value not in key.choices:
        raise UserError(f"{where} must be one of {', '.join(key.choices)}, got {value!r}")
    if key.each is not None:
        fewest, most = key.length
        count = f"{fewest} numbers" if fewest == most else "a non-empty list of numbers" if fewest else "a list of numbers"
        if (not isinstance(value, list) or not fewest <= len(value) <= (most or len(value))
                or not all(_is_number(v) and math.isfinite(v) and key.each.holds(v, values) for v in value)):
            raise UserError(f"{where} must be {count}, each {key.each.describe(section, values, names)}, got {value!r}")
    if key.range is not None and value is not None:
        if not _is_number(value):
            raise UserError(f"{where} must be a number, got {value!r}")
        if math.isinf(value) and not key.infinite_ok:
            raise UserError(f"{where} must be finite, got {value!r}")
        if not key.range.holds(value, values):
            raise UserError(f"{where} must be {key.range.describe(section, values, names)}, got {value!r}")


def check_ranges(section, values, names=None):
    """UserError unless every key of one section is allowed; `names` maps keys to what the user typed ({'steps': '--steps'})."""
    names = names or {}
    keys = {"network": NETWORK_KEYS, "diffusion": LOSS_KEYS}.get(section) or SCHEMA[section]
    for name, key in keys.items():
        if values.get(name) is not None:
            _check_value(key, names.get(name, f"{section}.{name}"), values[name], section, values, names)


def _check_network(net):
    """Beyond the ranges: whole sizes, a resolution that halves evenly at every level, attention where a level is."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    for key in INTEGER_NETWORK_KEYS:
        if net.get(key) is not None and not is_int(net[key]):
            raise UserError(f"network.{key} must be an integer, got {net[key]!r}")
    mult = net.get("channel_mult")
    if isinstance(mult, list) and not all(map(is_int, mult)):
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


def _check_augment(cfg):
    """network.augment_dim follows augment.p and augment.xflip (docs/AUGMENTATION.md, Configuration)."""
    net, a = cfg["network"], cfg["augment"]
    Augment(**a)  # the transform names
    if a["p"] > 0 and not a["transforms"]:
        raise UserError("augment.transforms must name at least one transform when augment.p > 0")
    if a["xflip"] > 0 and cfg["data"]["xflip"]:
        raise UserError("data.xflip (leaky) and augment.xflip (non-leaky) both flip images in x: set one of them")
    wanted = AUGMENT_DIM if is_on(a) else 0
    if "augment_dim" in net:
        if net["augment_dim"] not in (None, 0, wanted):
            raise UserError(f"network.augment_dim follows augment.p and augment.xflip (here {wanted}); leave it out of the config")
        net["augment_dim"] = wanted
    elif wanted:
        raise UserError(f"augment.p / augment.xflip need a network with an augment_dim argument, which {cfg['unet']} lacks")


# ----------------------------------------------------------------------------------------------------
# Network files.

def constructor_defaults(cls):
    """A section's keys: the constructor's arguments and defaults (None if none), with the base's where **kwargs passes on."""
    params = inspect.signature(cls.__init__).parameters
    out = {k: (None if p.default is p.empty else p.default) for k, p in params.items() if k != "self" and p.kind != p.VAR_KEYWORD}
    base = cls.__mro__[1]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()) and base not in (object, torch.nn.Module):
        out = {**constructor_defaults(base), **out}
    return out


def loss_class(name):
    if name not in LOSSES:
        raise UserError(f"loss: {name!r} is not a loss of tools/edm.py; allowed: {', '.join(LOSSES)}")
    return LOSSES[name]


def load_unet_class(unet_file):
    """The UNet class of a top-level unet*.py; no other module is imported (`unet: sample.py` would run its side effects)."""
    allowed = sorted(f for f in os.listdir(ROOT) if f.startswith("unet") and f.endswith(".py") and os.path.isfile(os.path.join(ROOT, f)))
    if unet_file not in allowed:
        raise UserError(f"unet: {unet_file!r} is not a network file; allowed: {', '.join(allowed)}")
    try:
        module = importlib.import_module(unet_file[:-3])
    except ModuleNotFoundError as e:
        raise UserError(f"unet: {unet_file} cannot be imported ({e}); run from the repository root {ROOT}") from None
    unet = getattr(module, "UNet", None)
    if not inspect.isclass(unet):
        raise UserError(f"unet: {unet_file} defines no UNet class; allowed: {', '.join(allowed)}")
    return unet


# ----------------------------------------------------------------------------------------------------
# Reading and resolving.

def _merge(cfg, overrides):
    """Apply `section.key=value` strings; values are parsed as YAML (2, 1e-3, true, [1, 2])."""
    for item in overrides:
        key, text = item.split("=", 1) if "=" in item else (item, None)
        if key in ("unet", "loss") and text:
            cfg[key] = text
            continue
        if text is None or "." not in key:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. train.epochs=2), unet=FILE or loss=NAME")
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


def _resolve_section(section, given, defaults):
    """The section's defaults (tuples as lists) updated by `given`, every key and type checked."""
    if not isinstance(given, dict):
        raise UserError(f"section {section!r} must be a mapping of keys to values")
    out = copy.deepcopy({k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()})
    for key, value in given.items():
        if key not in defaults:
            raise UserError(f"unknown key {section}.{key}; allowed: {', '.join(defaults)}")
        out[key] = _check_type(f"{section}.{key}", value, out[key])
    return out


def validate(raw):
    """Fill in defaults and check every key and type; returns the resolved config."""
    if not isinstance(raw, dict):
        raise UserError("a config must be a YAML mapping of sections")
    cfg = {key: raw.get(key, DEFAULTS[key]) for key in ("unet", "loss")}
    for key in ("unet", "loss"):
        if not isinstance(cfg[key], str):
            raise UserError(f"{key} must be a string such as {DEFAULTS[key]}, got {cfg[key]!r}")
    for key in raw:
        if key not in ("unet", "loss") and key not in SECTIONS:
            raise UserError(f"unknown top-level key {key!r}; allowed: unet, loss, {', '.join(SECTIONS)}")
    defaults = {**DEFAULTS, "network": constructor_defaults(load_unet_class(cfg["unet"])),
                "diffusion": constructor_defaults(loss_class(cfg["loss"]))}
    for section in SECTIONS:
        cfg[section] = out = _resolve_section(section, raw.get(section) or {}, defaults[section])
        if section != "network":
            check_ranges(section, out)
            continue
        missing = [k for k in ("img_resolution", "img_channels") if out.get(k) is None]
        if missing:
            raise UserError(f"network.{missing[0]} is required")
        _check_network(out)
    if 0 < cfg["train"]["eval_samples"] < MIN_CURVE_SAMPLES:
        raise UserError(f"train.eval_samples must be 0 (no quality curve) or at least {MIN_CURVE_SAMPLES} "
                        f"(4 seed blocks of 10), got {cfg['train']['eval_samples']}")
    _check_augment(cfg)
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


def dump(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------------------------------
# Building.

def build_network(cfg):
    """UNet(**cfg['network']) from the config's network file, its dropout layers numbered."""
    return number_dropout_layers(load_unet_class(cfg["unet"])(**cfg["network"]))


def build_edm(cfg):
    """The trainable model: network wrapped in EDM preconditioning, plus the loss (`loss:`, diffusion section)."""
    return EDM(build_network(cfg), loss_class(cfg["loss"])(**cfg["diffusion"]))


def parameter_count(cfg):
    """Parameters of the config's network (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_network(cfg).parameters())
