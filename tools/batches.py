"""The training set on the training device, and this rank's share of each step's global batch.

The order and every random draw are made for the global batch from (seed, step) (tools/schedule.py), then
sliced by rank, so a run is the same for any number of ranks or micro-batches.
"""

import torch

from tools.augment import Augment, is_on, step_generator
from tools.cli import UserError
from tools.data import to_float, to_uint8, trained_images
from tools.schedule import epoch_order, step_draws


def to_device(x, device):
    """A CPU tensor on `device`. To a GPU it goes from pinned memory without blocking: a copy from pageable memory would
    make the host wait for the device's queue, every step."""
    return (x.pin_memory() if torch.device(device).type == "cuda" else x).to(device, non_blocking=True)


class Batches:
    """The training images held whole on `device`; batch(step) is this rank's share of the global batch of `step`.
    `data`: (uint8 images, labels) to use instead of the config's (tools/bench.py's random pixels)."""

    def __init__(self, cfg, rank, world, device, data=None):
        T = cfg["train"]
        self.cfg, self.device = cfg, device
        B = self.batch_size = T["batch_size"]
        self.seed = T["seed"]
        if B % world:
            raise UserError(f"train.batch_size={B} must be divisible by the number of ranks ({world})")
        self.per_rank = B // world
        self.micro = T["batch_gpu"] or self.per_rank  # images per forward and backward
        if self.per_rank % self.micro:
            raise UserError(f"the per-rank batch {self.per_rank} must be divisible by train.batch_gpu={self.micro}")
        self.mine = slice(rank * self.per_rank, (rank + 1) * self.per_rank)

        images, labels = trained_images(cfg) if data is None else data
        self.images, self.labels = images.to(device), labels.to(device)
        self.steps_per_epoch = len(self.images) // B
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={B} exceeds the dataset ({len(self.images)} images)")
        self.label_dim = cfg["network"]["label_dim"]
        if cfg["data"]["use_labels"] and not self.label_dim:
            raise UserError("data.use_labels needs network.label_dim > 0 (the number of classes)")
        if cfg["data"]["use_labels"] and int(labels.max()) >= self.label_dim:
            raise UserError(f"network.label_dim={self.label_dim} but {cfg['data']['dataset']} has {int(labels.max()) + 1} classes: "
                            f"set network.label_dim={int(labels.max()) + 1}")
        self.epoch_img = self.steps_per_epoch * B
        self.perm, self.perm_epoch = None, -1
        self.augment = Augment(**cfg["augment"]) if is_on(cfg["augment"]) else None  # off: no draws at all

    def batch(self, step):
        """(images y, sigma, noise, class labels or None, dropout keys, augmentation vectors or None) of this rank at
        `step`. The augmentation of each image is drawn for the global batch from (seed, step), like the rest."""
        B, D, data = self.batch_size, self.cfg["diffusion"], self.cfg["data"]
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self.perm_epoch:
            self.perm, self.perm_epoch = to_device(epoch_order(self.seed, epoch, len(self.images)), self.device), epoch
        idx = self.perm[pos * B:(pos + 1) * B]
        sigma, noise, flip, drop, keys = step_draws(self.seed, step, B, self.images.shape[1:], D["P_mean"], D["P_std"], self.device)
        mine = self.mine
        idx, sigma, noise, flip, drop, keys = idx[mine], sigma[mine], noise[mine], flip[mine], drop[mine], keys[mine]
        y = to_float(self.images[idx])
        if data["xflip"]:
            y = torch.where(flip[:, None, None, None], y.flip(3), y)
        class_labels = None
        if data["use_labels"]:
            keep = (drop >= self.cfg["train"]["label_dropout"]).to(torch.float32)[:, None]
            class_labels = torch.nn.functional.one_hot(self.labels[idx], self.label_dim).to(torch.float32) * keep
        augment_labels = None
        if self.augment is not None:
            y, augment_labels = self.augment(y, to_device(self.augment.draw(B, step_generator(self.seed, step))[mine], self.device))
        return y, sigma, noise, class_labels, keys, augment_labels

    def augmented_examples(self, count, epoch):
        """uint8 [count, C, H, W]: the first training images as the augmentation of `epoch`'s grid shows them (drawn
        from (seed, 2^62 + epoch), apart from every training step's), for a person to see what training sees."""
        y = to_float(self.images[:count])  # a dataset may hold fewer
        y, _ = self.augment(y, to_device(self.augment.draw(len(y), step_generator(self.seed, 2 ** 62 + epoch)), self.device))
        return to_uint8(y)
