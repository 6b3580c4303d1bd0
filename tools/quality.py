"""Sample quality against the dataset, each metric's mean and std over disjoint seed blocks (docs/METRICS.md)."""

import numpy as np
import torch

from tools import fid, metrics
from tools.classifier import load_or_train, outputs
from tools.cli import UserError
from tools.data import load_dataset, trained_images
from tools.grid import pairs_grid, save_picture
from tools.inception import build_inception, features_of_images

KID_SUBSETS = 100
NEAREST_PAIRS = 32  # samples shown beside their nearest training image


def fd_key(row):
    return next(k for k in row if k.startswith("FD_") and not k.endswith("_std"))


def default_extractor(cfg):
    return "inception" if cfg["data"]["dataset"] in ("cifar10", "cifar100", "tinyimagenet") else "classifier"


def extract(extractor, model, images, device):
    """(features float64 [N, F], class probabilities [N, K] or None) of uint8 images."""
    if extractor == "classifier":
        return outputs(model, images, device=device)
    return features_of_images(model, images, device=device), None


def reference(cfg, extractor, model, device, inception_weights=None, inception_ref=None):
    """(mu, sigma, features) of the training split; for Inception, the FID reference statistics (as --fid auto)."""
    if extractor == "classifier":
        feats = extract(extractor, model, load_dataset(cfg, "train")[0], device)[0]
        return (*metrics.feature_stats(feats), feats)
    path = inception_ref or fid.auto_reference(cfg, inception_weights, device)
    mu, sigma, feats = fid.load_stats(path)
    if feats is None:
        raise UserError(f"{path} keeps no features (pytorch-fid's own statistics?): delete it so that it is recomputed")
    return mu, sigma, feats


def build_extractor(cfg, extractor, device, inception_weights=None):
    return load_or_train(cfg, device) if extractor == "classifier" else build_inception(inception_weights, device=device)


def _block_size(count, blocks):
    if count // blocks < 10:
        raise UserError(f"scoring needs at least {10 * blocks} samples ({blocks} blocks of 10), got {count}")
    return count // blocks


class Scorer:
    """Builds once per dataset what scoring needs, so that score() costs only the samples' own features."""

    def __init__(self, cfg, extractor=None, device="cpu", inception_weights=None, inception_ref=None, log=print):
        self.cfg, self.device = cfg, device
        self.extractor = extractor or default_extractor(cfg)
        self.model = build_extractor(cfg, self.extractor, device, inception_weights)
        self.mu_ref, self.sigma_ref, self.ref = reference(cfg, self.extractor, self.model, device, inception_weights, inception_ref)
        self.classifier = self.model if self.extractor == "classifier" else None
        self.train = trained_images(cfg)[0].to(device)
        try:
            self.heldout_dist = metrics.nearest_distances(load_dataset(cfg, "test")[0].to(device), self.train)[0]
        except UserError as e:
            log(f"memorisation not measured: {e}")
            self.heldout_dist = None

    def score(self, samples, blocks=4, pairs_path=None, classes=None):
        n = _block_size(len(samples), blocks)
        samples = torch.as_tensor(samples)[:n * blocks]
        feats, probs = extract(self.extractor, self.model, samples, self.device)
        if classes is not None:
            if self.classifier is None:
                self.classifier = build_extractor(self.cfg, "classifier", self.device)
            class_probs = probs if probs is not None else extract("classifier", self.classifier, samples, self.device)[1]
            requested = np.asarray(classes[:n * blocks], dtype=np.int64)
            if requested.max() >= self.classifier.num_classes:
                raise UserError(f"requested class {requested.max()} but the dataset {self.cfg['data']['dataset']} has "
                                f"{self.classifier.num_classes} classes: network.label_dim must be its number of classes")
        sample_dist, sample_idx = metrics.nearest_distances(samples.to(self.device), self.train)
        ref, per_block = self.ref, []
        for b in range(blocks):
            s = slice(b * n, (b + 1) * n)
            f = feats[s]
            row = {f"FD_{self.model.name}": metrics.frechet_distance(*metrics.feature_stats(f), self.mu_ref, self.sigma_ref),
                   "KID": metrics.kid(f, ref, num_subsets=KID_SUBSETS, subset_size=min(n, metrics.KID_SUBSET_SIZE))[0]}
            # k-NN radii shrink as a set grows: against as many random training features
            row.update(metrics.precision_recall(ref[np.random.default_rng(b).choice(len(ref), min(n, len(ref)), replace=False)], f))
            if probs is not None:
                row.update(metrics.class_coverage(probs[s]))
            if self.heldout_dist is not None:
                row.update(metrics.memorisation(sample_dist[s], self.heldout_dist))
            if classes is not None:
                row["class_accuracy"] = float((class_probs[s].argmax(1) == requested[s]).mean())
            per_block.append(row)
        out = dict(extractor=self.model.name, count=n * blocks, blocks=blocks, block_size=n, reference_count=len(ref))
        for key in per_block[0]:
            values = np.array([r[key] for r in per_block], dtype=np.float64)
            out[key], out[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1))
        if self.classifier is not None:
            out["classifier_test_accuracy"] = self.classifier.test_accuracy
        if pairs_path is not None:
            out["nearest_pairs"] = save_nearest_pairs(pairs_path, samples, self.train.cpu(), sample_idx, sample_dist)
        return out


def score_samples(cfg, samples, extractor=None, device="cpu", blocks=4, pairs_path=None, inception_weights=None, inception_ref=None, classes=None):
    """Quality metrics (mean and <metric>_std over `blocks` blocks) of uint8 samples [N, C, H, W] in seed order."""
    _block_size(len(samples), blocks)  # before building anything
    scorer = Scorer(cfg, extractor, device, inception_weights, inception_ref, log=lambda m: print(m, flush=True))
    return scorer.score(samples, blocks, pairs_path, classes)


def save_nearest_pairs(path, samples, train_images, index, dists, num=NEAREST_PAIRS):
    """A PNG of the `num` samples nearest to the training set beside their nearest training image, nearest first."""
    order = np.argsort(np.asarray(dists), kind="stable")[:num]
    nearest = torch.as_tensor(train_images)[torch.from_numpy(np.asarray(index)[order])]
    return save_picture(path, pairs_grid(torch.as_tensor(samples)[torch.from_numpy(order)], nearest))


def format_line(r):
    pm = lambda k, spec, scale=1, unit="": f"{scale * r[k]:{spec}}{unit} +- {scale * r[k + '_std']:{spec}}{unit}"
    fd = fd_key(r)
    parts = [f"{fd}: {pm(fd, '.3f')}", f"KID: {pm('KID', '.5f')}", f"precision: {pm('precision', '.3f')}", f"recall: {pm('recall', '.3f')}"]
    if "class_entropy" in r:
        parts += [f"class entropy: {r['class_entropy']:.3f}/{r['class_entropy_max']:.3f}", f"confidence: {r['confidence']:.3f}"]
    if "memorised_fraction" in r:
        parts.append(f"memorised: {pm('memorised_fraction', '.1f', 100, '%')}")
    if "class_accuracy" in r:
        parts.append(f"requested-class accuracy: {pm('class_accuracy', '.1f', 100, '%')}")
    return "  ".join(parts) + f"  ({r['blocks']} blocks of {r['block_size']} samples)"
