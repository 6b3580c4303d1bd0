"""pytorch-fid's Inception-v3 (pool3, 2048 features), with its weights read from a local file (docs/METRICS.md)."""

import hashlib
import os
import socket
import sys

import numpy as np
import torch

from tools.cli import UserError, first_line

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # in the file name, as torch hub wants
FEATURE_DIM = 2048  # Inception-v3 pool3


def _hub_file():
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def find_inception_weights(path=None):
    """`path`, else $FID_INCEPTION_WEIGHTS, else the torch hub cache's file; None if there is none."""
    for given, where in ((path, "--inception-weights"), (os.environ.get("FID_INCEPTION_WEIGHTS"), "FID_INCEPTION_WEIGHTS")):
        if given:
            if not os.path.isfile(given):
                raise UserError(f"{where}={given}: no such file; it must be pytorch-fid's {WEIGHTS_FILE} ({WEIGHTS_URL})")
            return given
    return _hub_file() if os.path.isfile(_hub_file()) else None


def inception_weights_or_none(path=None):
    """find_inception_weights(), else a download into the torch hub cache; offline, one line and None."""
    if (found := find_inception_weights(path)) is not None:
        return found
    cached, timeout = _hub_file(), socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(30)  # a firewall that drops packets must not hang the run
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, cached, hash_prefix=WEIGHTS_SHA256_PREFIX, progress=False)
        return cached
    except Exception as e:  # no network, a proxy's error page (hash mismatch), a read-only cache
        print(f"Inception scoring skipped: no {WEIGHTS_FILE} here and it could not be downloaded ({type(e).__name__}). "
              f"Pass --inception-weights PATH or set FID_INCEPTION_WEIGHTS=PATH (see docs/METRICS.md)", flush=True)
        return None
    finally:
        socket.setdefaulttimeout(timeout)


def build_inception(weights_path=None, random_weights=False, device="cpu"):
    """pytorch-fid's FID Inception-v3 from a local weights file (random_weights: a fixed random one, for tests)."""
    import pytorch_fid.inception as fid_inception  # lazy: seconds of start-up
    if random_weights:
        path, state_dict, extractor = "random weights", random_inception_state_dict(), "inception-v3-RANDOM"
    else:
        if (path := find_inception_weights(weights_path)) is None:
            raise UserError(f"scoring needs pytorch-fid's Inception weights {WEIGHTS_FILE}: pass --inception-weights PATH, set "
                            f"FID_INCEPTION_WEIGHTS=PATH or put it in {os.path.dirname(_hub_file())} (on a machine with internet: {WEIGHTS_URL})")
        state_dict, extractor = _read_weights(path)
    # pytorch-fid's constructor fetches its weights by URL and draws from the global RNG: it gets the state dict read here
    fetch, fid_inception.load_state_dict_from_url = fid_inception.load_state_dict_from_url, lambda *args, **kwargs: state_dict
    try:
        with torch.random.fork_rng(devices=[]):
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True, normalize_input=True)
    except RuntimeError as e:
        raise UserError(f"{path}: not pytorch-fid's Inception weights ({first_line(e)}); get {WEIGHTS_URL}") from None
    finally:
        fid_inception.load_state_dict_from_url = fetch
    model.extractor, model.name = extractor, "inception"
    return model.eval().requires_grad_(False).to(device)


def random_inception_state_dict(seed=0):
    import torchvision  # lazy: seconds of start-up, and only scoring needs it
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2  # lazy: as torchvision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (FIDInceptionA(c, pool_features=p) for c, p in ((192, 32), (256, 64), (288, 64)))
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (FIDInceptionC(768, channels_7x7=c) for c in (128, 160, 160, 192))
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):  # the default init shrinks pool3 to ~1e-8 and every FID to ~0
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


def _read_weights(path):
    """(state dict, extractor name) of a weights file; one other than the published file is named unverified."""
    try:
        with open(path, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read the Inception weights ({type(e).__name__}: {first_line(e)}); "
                        f"replace it with {WEIGHTS_URL}") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: not a state dict; replace it with {WEIGHTS_URL}")
    if sha.startswith(WEIGHTS_SHA256_PREFIX):
        return state_dict, "inception-v3-pytorch-fid"
    print(f"warning: {path} is not the published {WEIGHTS_FILE} (sha256 {sha[:8]}...): FIDs are not comparable to published ones",
          file=sys.stderr, flush=True)
    return state_dict, f"inception-v3-unverified-{sha[:8]}"


def weights_name(path):
    return _read_weights(path)[1]


def features_of_images(model, images, batch=200, device=None, stats=None):
    """Pool3 features of uint8 images [N, C, H, W]: float64 numpy [N, 2048], or added to FeatureStats `stats`."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"expected uint8 images [N, C, H, W] with C = 1 or 3, got {images.dtype} {tuple(images.shape)}")
    device = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device).to(torch.float32) / 255
            f = model(x.expand(-1, 3, -1, -1))[0].flatten(1).to(torch.float64)  # grey -> RGB, as PIL's convert("RGB")
            if stats is not None:
                stats.update(f)
            else:
                out.append(f.cpu())
    return stats if stats is not None else torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))
