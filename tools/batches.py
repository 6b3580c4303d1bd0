"""This rank's share of each step's global batch: every draw is made for the global batch and sliced, so any rank count gives the same run."""

from collections import namedtuple

import torch

from tools.augment import Augment, is_on
from tools.cli import UserError
from tools.data import to_float, to_uint8, trained_images
from tools.rng import AUGMENT_DRAWS, BATCH_DRAWS, DATA_ORDER, StepNormals, generator

# images: this rank's [n, C, H, W] in [-1, 1]; normals: the loss's StepNormals; rows: this rank's rows of the global
# batch; conditioning: the network's keyword inputs (class_labels, augment_labels, dropout_keys), None where absent.
Batch = namedtuple("Batch", "images normals rows conditioning")


def to_device(x, device):
    """A CPU tensor on `device`, through pinned memory to a GPU: from pageable memory the host would wait every step."""
    return (x.pin_memory() if torch.device(device).type == "cuda" else x).to(device, non_blocking=True)


class Batches:
    """The training images held whole on `device`; `data`: (uint8 images, labels) instead of the config's (tools/bench.py)."""

    def __init__(self, cfg, rank, world, device, data=None):
        self.cfg, self.device, self.seed = cfg, device, cfg["train"]["seed"]
        B = self.batch_size = cfg["train"]["batch_size"]
        if B % world:
            raise UserError(f"train.batch_size={B} must be divisible by the number of ranks ({world})")
        self.per_rank = B // world
        self.micro = cfg["train"]["batch_gpu"] or self.per_rank  # images per forward and backward
        if self.per_rank % self.micro:
            raise UserError(f"the per-rank batch {self.per_rank} must be divisible by train.batch_gpu={self.micro}")
        self.mine = slice(rank * self.per_rank, (rank + 1) * self.per_rank)

        images, labels = trained_images(cfg) if data is None else data
        self.images, self.labels = images.to(device), labels.to(device)
        self.steps_per_epoch = len(self.images) // B
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={B} exceeds the dataset ({len(self.images)} images)")
        self.label_dim = cfg["network"]["label_dim"]
        classes = int(labels.max()) + 1 if cfg["data"]["use_labels"] else 0
        if classes > self.label_dim:
            raise UserError(f"network.label_dim={self.label_dim} but {cfg['data']['dataset']} has {classes} classes (data.use_labels): "
                            f"set network.label_dim={classes}")
        self.epoch_img = self.steps_per_epoch * B
        self.perm, self.perm_epoch = None, -1
        self.augment = Augment(**cfg["augment"]) if is_on(cfg["augment"]) else None  # off: no draws at all

    def batch(self, step):
        B, data = self.batch_size, self.cfg["data"]
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self.perm_epoch:
            order = torch.randperm(len(self.images), generator=generator(self.seed, epoch, DATA_ORDER))
            self.perm, self.perm_epoch = to_device(order, self.device), epoch
        mine = self.mine
        g = generator(self.seed, step, BATCH_DRAWS, device=self.device)
        flip, drop = (torch.rand(B, generator=g, device=self.device)[mine] for _ in range(2))
        keys = torch.randint(2 ** 31, (B,), generator=g, device=self.device)[mine]  # fix each sample's dropout masks
        idx = self.perm[pos * B:(pos + 1) * B][mine]
        y = to_float(self.images[idx])
        if data["xflip"]:
            y = torch.where((flip < 0.5)[:, None, None, None], y.flip(3), y)
        class_labels = augment_labels = None
        if data["use_labels"]:
            keep = (drop >= self.cfg["train"]["label_dropout"]).to(torch.float32)[:, None]
            class_labels = torch.nn.functional.one_hot(self.labels[idx], self.label_dim).to(torch.float32) * keep
        if self.augment is not None:
            draws = self.augment.draw(B, generator(self.seed, step, AUGMENT_DRAWS))[mine]
            y, augment_labels = self.augment(y, to_device(draws, self.device))
        return Batch(y, StepNormals(self.seed, step, B, self.device), mine,
                     dict(class_labels=class_labels, augment_labels=augment_labels, dropout_keys=keys))

    def augmented_examples(self, count, epoch):
        """uint8 [count, C, H, W]: the first training images augmented for `epoch`'s grid, by draws apart from training's."""
        y = to_float(self.images[:count])  # a dataset may hold fewer
        draws = self.augment.draw(len(y), generator(self.seed, epoch, AUGMENT_DRAWS, 1))
        return to_uint8(self.augment(y, to_device(draws, self.device))[0])
