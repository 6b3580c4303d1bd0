"""A small CNN classifier of a dataset, trained here and cached: metric features without a download (docs/METRICS.md)."""

import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from tools.checkpoint import atomic_save, verify
from tools.cli import UserError
from tools.data import cache_dir, load_dataset, to_float

WIDTH = 32             # channels of the first stage; the features have 4 * WIDTH
EPOCHS = 15            # passes over a small training split
STEPS_MAX = 6000       # cap on optimizer steps, so that CIFAR-sized sets train in minutes on a GPU
BATCH = 64             # images per step
LR = 3e-3              # peak of the one-cycle schedule
SEED = 0               # weights, data order and shifts
SMALL_DATASET = 20000  # smaller training splits train on the CPU (deterministic)


class Classifier(torch.nn.Module):
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

    def features(self, x):  # pooled penultimate activations [N, 4 * WIDTH] of float images in [-1, 1]
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _fingerprint(images, labels):
    h = hashlib.sha256(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    with open(__file__, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:12]


def _train(images, labels, num_classes, device):
    torch.manual_seed(SEED)
    model = Classifier(images.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    batch = min(BATCH, len(images))
    total = min(EPOCHS * (len(images) // batch), STEPS_MAX)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=total)
    g = torch.Generator().manual_seed(SEED)
    x_all, y_all, step = images.to(device), labels.to(device), 0
    while step < total:
        for idx in torch.randperm(len(images), generator=g).split(batch):
            if len(idx) < batch or step == total:
                continue
            idx = idx.to(device)
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # small shifts: robustness to samples
            loss = F.cross_entropy(model(torch.roll(to_float(x_all[idx]), shifts=shift, dims=(2, 3))), y_all[idx])
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
    return float((outputs(model, images)[1].argmax(1) == labels.numpy()).mean())


def load_or_train(cfg, device="cpu", log=print):
    """The classifier of `cfg`'s dataset and resolution, cached under a hash of the data and this file."""
    images, labels = load_dataset(cfg, "train")
    num_classes, dataset = int(labels.max()) + 1, cfg["data"]["dataset"]
    if num_classes < 2:
        raise UserError(f"{dataset}: the dataset classifier needs labelled images of at least 2 classes "
                        f"(a folder dataset needs one sub-folder per class); use --metric-features inception")
    tag = f"{dataset}-{images.shape[-1]}px-{_fingerprint(images, labels)}"
    path, model = cache_dir(cfg, "metric-classifiers", f"{tag}.pt"), None
    if os.path.isfile(path):  # missing, altered or unreadable: trained again
        try:
            verify(path, "dataset classifier", advice="training it again")
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = Classifier(images.shape[1], num_classes)
            model.load_state_dict(state["model"])
            model.test_accuracy = state["test_accuracy"]
        except Exception as e:  # a UserError: a checksum mismatch
            model = None
            log(str(e) if isinstance(e, UserError) else f"dataset classifier {path} is unreadable ({type(e).__name__}); training it again")
    if model is None:
        train_device = torch.device("cpu") if len(images) < SMALL_DATASET else torch.device(device)
        log(f"training the dataset classifier for {dataset} ({len(images)} images, {num_classes} classes, "
            f"{train_device.type}); cached in {path}")
        model = _train(images, labels, num_classes, train_device).cpu()
        model.test_accuracy = accuracy(model, *load_dataset(cfg, "test"))
        atomic_save(dict(model=model.state_dict(), test_accuracy=model.test_accuracy, dataset=dataset, num_classes=num_classes), path)
        log(f"dataset classifier: {model.test_accuracy * 100:.2f}% test accuracy")
    model.name, model.tag = "classifier", tag
    return model.eval().requires_grad_(False).to(device)
