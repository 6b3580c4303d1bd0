"""pytorch-fid's Inception-v3 (pool3, 2048-d features) and its weights, read from a local file.

Weights: --inception-weights PATH, else $FID_INCEPTION_WEIGHTS, else the torch hub cache; where the network
allows, inception_weights_or_none() downloads them into the hub cache as pytorch-fid itself would. The
published file is recognised by its sha256 prefix; another file is used but named unverified wherever its
numbers are written. random_inception_state_dict() gives a fixed random network of the same shape, so the
scoring pipeline can be tested where the weights cannot be downloaded.
"""

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import tempfile

import numpy as np
import torch

from tools.cli import UserError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX = "6726825d"     # torch hub convention: the file name carries its sha256 prefix
FEATURE_DIM = 2048                     # Inception-v3 pool3



def find_inception_weights(path=None):
    """The weights file: `path`, else $FID_INCEPTION_WEIGHTS, else the torch hub cache; None if none is set or cached."""
    for given, where in ((path, "--inception-weights"), (os.environ.get("FID_INCEPTION_WEIGHTS"), "FID_INCEPTION_WEIGHTS")):
        if given:
            if not os.path.isfile(given):
                raise UserError(f"{where}={given}: no such file; it must be pytorch-fid's {WEIGHTS_FILE} ({WEIGHTS_URL})")
            return given
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    return cached if os.path.isfile(cached) else None


def inception_weights_or_none(path=None):
    """A local weights file (as find_inception_weights); failing that, pytorch-fid's download into the torch
    hub cache, as pytorch-fid itself would do. Offline, says how to provide the file and returns None."""
    found = find_inception_weights(path)
    if found is not None:
        return found
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    timeout = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(30)  # a firewall that drops packets should not hang the run
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, cached, hash_prefix=WEIGHTS_SHA256_PREFIX, progress=False)
        return cached
    except Exception as e:  # no network (URLError, timeouts), a proxy's error page (hash mismatch), a read-only cache
        print(f"Inception scoring skipped: no {WEIGHTS_FILE} here and it could not be downloaded ({type(e).__name__}). "
              f"Pass --inception-weights PATH or set FID_INCEPTION_WEIGHTS=PATH (see docs/METRICS.md)", flush=True)
        return None
    finally:
        socket.setdefaulttimeout(timeout)


def build_inception(weights_path=None, random_weights=False, device="cpu"):
    """pytorch-fid's FID Inception-v3 (pool3 output, resizes to 299 and maps [0, 1] to [-1, 1] itself), in eval mode.

    The weights come from a local file, never the network. random_weights=True is for tests: a fixed random
    network whose name, `model.extractor`, says RANDOM wherever its statistics are written.
    """
    import pytorch_fid.inception as fid_inception  # lazy: importing pytorch-fid costs seconds, and only scoring needs it

    with tempfile.TemporaryDirectory(prefix="fid-hub-") as tmp:
        if random_weights:
            path, extractor = os.path.join(tmp, "inception-v3-random.pth"), "inception-v3-RANDOM"
            torch.save(random_inception_state_dict(), path)
        else:
            path = find_inception_weights(weights_path)
            if path is None:
                raise UserError(f"scoring needs pytorch-fid's Inception weights {WEIGHTS_FILE}: pass --inception-weights PATH, set "
                                f"FID_INCEPTION_WEIGHTS=PATH or put it in {os.path.join(torch.hub.get_dir(), 'checkpoints')} "
                                f"(on a machine with internet: {WEIGHTS_URL})")
            extractor = weights_name(path)
        # The constructor's default init draws from the global RNG: leave the caller's stream as it was.
        with _hub_cache_holding(path, tmp), torch.random.fork_rng(devices=[]):
            try:
                model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True, normalize_input=True)
            except RuntimeError as e:
                raise UserError(f"{path}: not pytorch-fid's Inception weights "
                                f"({str(e).splitlines()[0]}); get {WEIGHTS_URL}") from None
    model.extractor = extractor
    return model.eval().requires_grad_(False).to(device)


@contextlib.contextmanager
def _hub_cache_holding(path, tmp):
    """torch.hub's cache holds `path` as checkpoints/WEIGHTS_FILE while the block runs, so pytorch-fid's constructor, whose
    load_state_dict_from_url(FID_WEIGHTS_URL) loads <hub dir>/checkpoints/<URL file name> when it exists (no hash check)
    and downloads otherwise, loads `path`. The real cache is used when `path` is its file, else the empty folder `tmp`."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if os.path.isfile(cached) and os.path.samefile(path, cached):
        yield
        return
    os.makedirs(os.path.join(tmp, "checkpoints"))
    link = os.path.join(tmp, "checkpoints", WEIGHTS_FILE)
    try:
        os.symlink(os.path.abspath(path), link)
    except OSError:  # a file system without symlinks
        shutil.copyfile(path, link)
    if not os.path.isfile(link):  # torch.hub would download it
        raise UserError(f"{path}: cannot be read through {link}; copy it to {cached}")
    # set_dir pins the hub dir; restoring None (not get_dir()'s value) lets $TORCH_HOME steer it again afterwards.
    pinned = torch.hub._hub_dir
    torch.hub.set_dir(tmp)
    try:
        yield
    finally:
        torch.hub._hub_dir = pinned


def random_inception_state_dict(seed=0):
    """A state dict with exactly the keys and shapes of pytorch-fid's FID Inception, random: for tests, no file needed.

    Built as pytorch-fid's fid_inception_v3 builds its network; the convs are kaiming-initialised because PyTorch's
    default init shrinks pool3 activations to ~1e-8, which would make every random-network FID ~0."""
    import torchvision  # lazy: torchvision and pytorch-fid cost seconds of start-up, and only scoring needs them
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2  # lazy: as torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inception = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
        inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
        inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
        inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        inception.Mixed_7b = FIDInceptionE_1(1280)
        inception.Mixed_7c = FIDInceptionE_2(2048)
        for m in inception.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return inception.state_dict()


def weights_name(path):
    """The extractor name of a weights file; a file other than the published one is named unverified, with a warning.

    The file is read here with weights_only=True, as pytorch-fid's own load is not: a pickle that is not a plain state
    dict fails here in one line instead of running."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read the Inception weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"replace it with {WEIGHTS_URL}") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: not a state dict; replace it with {WEIGHTS_URL}")
    sha = h.hexdigest()
    if sha.startswith(WEIGHTS_SHA256_PREFIX):
        return "inception-v3-pytorch-fid"
    print(f"warning: {path} is not the published {WEIGHTS_FILE} (sha256 {sha[:8]}...): FIDs are not comparable to published ones",
          file=sys.stderr, flush=True)
    return f"inception-v3-unverified-{sha[:8]}"


def features_of_images(model, images, batch=200, device=None, stats=None):
    """Pool3 features of uint8 images [N, C, H, W] (C = 1 or 3), fed exactly as quantised: float64 numpy [N, 2048],
    or, with `stats`, accumulated into that FeatureStats (returned)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"expected uint8 images [N, C, H, W] with C = 1 or 3, got {images.dtype} {tuple(images.shape)}")
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device).to(torch.float32) / 255
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)  # gray -> RGB, as PIL's convert("RGB") does for pytorch-fid
            f = model(x)[0].flatten(1).to(torch.float64)
            if stats is not None:
                stats.update(f)
            else:
                out.append(f.cpu())
    if stats is not None:
        return stats
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))
