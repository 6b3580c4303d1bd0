"""A small CNN classifier of a dataset, trained here, as a feature extractor that needs no download.

Its pooled penultimate activations are the features of FD_classifier, KID, precision and recall, and
its softmax gives the class coverage of a sample set (tools/quality.py). MNIST-style generative papers
score with such a dataset classifier; its numbers are comparable only with numbers from the same
classifier (the file name carries a hash of the training data and of this file's code).

The classifier trains once per dataset and resolution with a fixed seed, on the CPU for small
datasets (digits: seconds), and is cached under DATA_CACHE/metric-classifiers/; a change of the data
or of this file trains a new one.
"""

import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from tools.checkpoint import atomic_save, verify
from tools.cli import UserError
from tools.data import cache_dir, load_dataset, to_float

WIDTH = 32            # Channels of the first stage; the features have 4 * WIDTH channels.
EPOCHS = 15           # Passes over a small training split; large ones get fewer (STEPS_MAX).
STEPS_MAX = 6000      # Cap on optimizer steps, so CIFAR-sized sets train in minutes on a GPU.
BATCH = 64            # Images per step.
LR = 3e-3             # Peak of the one-cycle schedule.
SEED = 0              # Weights, data order and shifts: the classifier is a function of the data and this file.
SMALL_DATASET = 20000  # Below this many training images, train on the CPU (deterministic, fast enough).


class Classifier(torch.nn.Module):
    """Three conv stages (each two 3x3 convs with group norm and ReLU), global average pooling, a linear head."""

    def __init__(self, img_channels, num_classes, width=WIDTH):
        super().__init__()
        layers, c = [], img_channels
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(torch.nn.MaxPool2d(2))
            for _ in range(2):
                layers += [torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.GroupNorm(8, w), torch.nn.ReLU()]
                c = w
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(c, num_classes)
        self.feature_dim, self.num_classes = c, num_classes

    def features(self, x):
        """Pooled penultimate activations [N, 4 * WIDTH] of float images in [-1, 1]."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _fingerprint(images, labels):
    """Hash of the training data, of this file (the architecture and recipe) and of the torch major version."""
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    with open(__file__, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:12]


def _train(images, labels, num_classes, device):
    torch.manual_seed(SEED)
    model = Classifier(images.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    batch = min(BATCH, len(images))  # a folder of fewer images than BATCH: one batch of all of them per step
    steps_per_epoch = len(images) // batch
    total = min(EPOCHS * steps_per_epoch, STEPS_MAX)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=total)
    g = torch.Generator().manual_seed(SEED)
    x_all, y_all = images.to(device), labels.to(device)
    step = 0
    while step < total:
        for idx in torch.randperm(len(images), generator=g).split(batch):
            if len(idx) < batch or step == total:
                continue
            idx = idx.to(device)
            x = to_float(x_all[idx])
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # small translations: robustness to samples
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return model.eval()


@torch.no_grad()
def outputs(model, images, batch=500, device=None):
    """(features float64 [N, F], class probabilities float64 [N, K]) of uint8 images [N, C, H, W]."""
    device = device or next(model.parameters()).device
    feats, probs = [], []
    for i in range(0, len(images), batch):
        f = model.features(to_float(images[i:i + batch].to(device)))
        feats.append(f.double().cpu())
        probs.append(model.head(f).double().softmax(dim=1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def accuracy(model, images, labels):
    _, probs = outputs(model, images)
    return float((probs.argmax(1) == labels.numpy()).mean())


def load_or_train(cfg, device="cpu", log=print):
    """The dataset classifier of `cfg`'s dataset and resolution: loaded from the cache, or trained and cached.
    Returns the model (eval mode) with `.name` (for FD_<name>) and `.test_accuracy` set."""
    images, labels = load_dataset(cfg, "train")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise UserError(f"{cfg['data']['dataset']}: the dataset classifier needs labelled images of at least 2 classes "
                        f"(a folder dataset needs one sub-folder per class); use --metric-features inception")
    d = cfg["data"]
    tag = f"{d['dataset']}-{images.shape[-1]}px-{_fingerprint(images, labels)}"
    path = cache_dir(cfg, "metric-classifiers", f"{tag}.pt")
    train_device = torch.device("cpu") if len(images) < SMALL_DATASET else torch.device(device)
    if os.path.isfile(path):
        try:
            verify(path, "dataset classifier", advice="training it again")
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = Classifier(images.shape[1], num_classes)
            model.load_state_dict(state["model"])
            model.test_accuracy = state["test_accuracy"]
        except UserError as e:  # checksum mismatch
            log(str(e))
            state = None
        except Exception as e:
            log(f"dataset classifier {path} is unreadable ({type(e).__name__}); training it again")
            state = None
    else:
        state = None
    if state is None:
        log(f"training the dataset classifier for {d['dataset']} ({len(images)} images, {num_classes} classes, "
            f"{train_device.type}); cached in {path}")
        model = _train(images, labels, num_classes, train_device).cpu()
        test_images, test_labels = load_dataset(cfg, "test")
        model.test_accuracy = accuracy(model, test_images, test_labels)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save(dict(model=model.state_dict(), test_accuracy=model.test_accuracy, dataset=d["dataset"],
                         num_classes=num_classes), path)
        log(f"dataset classifier: {model.test_accuracy * 100:.2f}% test accuracy")
    model.name = "classifier"
    model.tag = tag
    return model.eval().requires_grad_(False).to(device)
