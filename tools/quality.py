"""Sample quality of a set of generated images against its dataset, with the spread over seed blocks.

    score_samples(cfg, images) -> {"FD_classifier": ..., "KID": ..., "precision": ..., "recall": ...,
                                   "class_entropy": ..., "confidence": ..., "memorised_fraction": ..., ...}

Features come from the dataset classifier (tools/classifier.py, no download, the default for digits)
or from pytorch-fid's Inception-v3 (tools/fid.py, the default for CIFAR and Tiny-ImageNet). Every
metric is computed on each of `blocks` disjoint blocks of the samples (consecutive seed ranges) and
reported as mean and std over the blocks, with the block size, so that two runs' figures can be
told apart from noise. Memorisation is measured in pixels, whatever the features. Samples of a
class-conditional model, given their requested classes, also get `class_accuracy`: how often the dataset
classifier (whatever the features) names the requested class, which measures how well conditioning works.
"""

import numpy as np
import torch

from tools import fid, metrics
from tools.classifier import load_or_train, outputs
from tools.cli import UserError
from tools.data import load_dataset, trained_images
from tools.grid import pairs_grid, save_picture
from tools.inception import build_inception, features_of_images

EXTRACTORS = ("classifier", "inception")
KID_SUBSETS = 100
NEAREST_PAIRS = 32  # samples shown beside their nearest training image


def fd_key(row):
    """The Frechet-distance key of a quality row: FD_classifier or FD_inception (whichever features scored it)."""
    return next(k for k in row if k.startswith("FD_") and not k.endswith("_std"))


def default_extractor(cfg):
    """The dataset classifier for digits and folder data, Inception for the natural-image benchmarks."""
    return "inception" if cfg["data"]["dataset"] in ("cifar10", "cifar100", "tinyimagenet") else "classifier"


def extract(extractor, model, images, device):
    """(features float64 [N, F], class probabilities [N, K] or None) of uint8 images under `extractor`
    ("classifier" or "inception") with the `model` build_extractor() returned."""
    if extractor == "classifier":
        return outputs(model, images, device=device)
    return features_of_images(model, images, device=device), None


def reference(cfg, extractor, model, device, inception_weights=None, inception_ref=None):
    """(mu, sigma, features) of the training split: all of it for the classifier; for Inception, the FID
    reference statistics of the whole split with the up to 10,000 features they keep (`inception_ref`, or
    computed once into DATA_CACHE/fid-refs/ as sample.py --fid auto does)."""
    if extractor == "classifier":
        images, _ = load_dataset(cfg, "train")
        feats = extract(extractor, model, images, device)[0]
        return (*metrics.feature_stats(feats), feats)
    path = inception_ref or fid.auto_reference(cfg, inception_weights, device)
    mu, sigma, feats = fid.load_stats(path)
    if feats is None:
        raise UserError(f"{path} keeps no features (pytorch-fid's own statistics?): delete it so that it is recomputed")
    return mu, sigma, feats


def build_extractor(cfg, extractor, device, inception_weights=None):
    if extractor not in EXTRACTORS:
        raise UserError(f"--metric-features must be one of {', '.join(EXTRACTORS)}, got {extractor!r}")
    if extractor == "classifier":
        return load_or_train(cfg, device)
    model = build_inception(inception_weights, device=device)
    model.name = "inception"
    return model


class Scorer:
    """What scoring costs once per dataset: the feature extractor, the training split's reference features, and
    the held-out split's distances to the training set (the memorisation threshold). score() then costs only
    the samples' own features and distances, so a training run can score a quality curve every few epochs."""

    def __init__(self, cfg, extractor=None, device="cpu", inception_weights=None, inception_ref=None, log=print):
        self.cfg, self.device = cfg, device
        self.extractor = extractor or default_extractor(cfg)
        self.model = build_extractor(cfg, self.extractor, device, inception_weights)
        self.mu_ref, self.sigma_ref, self.ref = reference(cfg, self.extractor, self.model, device, inception_weights, inception_ref)
        self.classifier = self.model if self.extractor == "classifier" else None
        self.train, _ = trained_images(cfg)
        self.train = self.train.to(device)
        try:
            heldout, _ = load_dataset(cfg, "test")
            self.heldout_dist, _ = metrics.nearest_distances(heldout.to(device), self.train)
        except UserError as e:
            log(f"memorisation not measured: {e}")
            self.heldout_dist = None

    def score(self, samples, blocks=4, pairs_path=None, classes=None):
        """Quality metrics of uint8 samples [N, C, H, W] (in seed order); see score_samples."""
        samples = torch.as_tensor(samples)
        n = len(samples) // blocks
        if n < 10:
            raise UserError(f"scoring needs at least {10 * blocks} samples ({blocks} blocks of 10), got {len(samples)}")
        samples = samples[:n * blocks]
        feats, probs = extract(self.extractor, self.model, samples, self.device)
        if classes is not None:
            if self.classifier is None:
                self.classifier = build_extractor(self.cfg, "classifier", self.device)
                class_probs = extract("classifier", self.classifier, samples, self.device)[1]
            else:
                class_probs = probs
            requested = np.asarray(classes[:n * blocks], dtype=np.int64)
            if requested.max() >= self.classifier.num_classes:
                raise UserError(f"requested class {requested.max()} but the dataset {self.cfg['data']['dataset']} has "
                                f"{self.classifier.num_classes} classes: network.label_dim must be its number of classes")
        sample_dist, sample_idx = metrics.nearest_distances(samples.to(self.device), self.train)

        name, ref = f"FD_{self.model.name}", self.ref
        per_block = []
        for b in range(blocks):
            s = slice(b * n, (b + 1) * n)
            f = feats[s]
            row = {name: metrics.frechet_distance(*metrics.feature_stats(f), self.mu_ref, self.sigma_ref)}
            row["KID"] = metrics.kid(f, ref, num_subsets=KID_SUBSETS, subset_size=min(n, metrics.KID_SUBSET_SIZE))[0]
            # k-NN radii shrink as a set grows: compare with an equally large random subset of the training features.
            real = ref[np.random.default_rng(b).choice(len(ref), min(n, len(ref)), replace=False)]
            row.update(metrics.precision_recall(real, f, k=3))
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


def score_samples(cfg, samples, extractor=None, device="cpu", blocks=4, pairs_path=None, inception_weights=None,
                  inception_ref=None, classes=None):
    """Quality metrics of uint8 samples [N, C, H, W] (in seed order) against the config's dataset.

    Returns a dict: for each metric its mean over `blocks` disjoint blocks and `<metric>_std`, plus
    `count`, `blocks`, `block_size`, `extractor` and, for the classifier, its `classifier_test_accuracy`.
    With `pairs_path`, the samples closest to a training image are saved beside them in that PNG. Memorisation
    needs the dataset's test split (its distances to the training set set the threshold); without one it is skipped.
    `classes` (the requested class of each sample, conditional models) adds `class_accuracy` and the classifier's test accuracy.
    """
    if len(samples) // blocks < 10:
        raise UserError(f"scoring needs at least {10 * blocks} samples ({blocks} blocks of 10), got {len(samples)}")
    scorer = Scorer(cfg, extractor, device, inception_weights, inception_ref, log=lambda m: print(m, flush=True))
    return scorer.score(samples, blocks, pairs_path, classes)


def save_nearest_pairs(path, samples, train_images, index, dists, num=NEAREST_PAIRS):
    """A PNG of the `num` samples closest to the training set, each beside its nearest training image, closest first
    (uint8 [N, C, H, W]; `index` and `dists` from metrics.nearest_distances). Returns `path`."""
    order = np.argsort(np.asarray(dists), kind="stable")[:num]
    nearest = torch.as_tensor(train_images)[torch.from_numpy(np.asarray(index)[order])]
    return save_picture(path, pairs_grid(torch.as_tensor(samples)[torch.from_numpy(order)], nearest))


def format_line(r):
    """One line for the terminal: every metric as mean +- std over the blocks."""
    fd = fd_key(r)
    parts = [f"{fd}: {r[fd]:.3f} +- {r[fd + '_std']:.3f}", f"KID: {r['KID']:.5f} +- {r['KID_std']:.5f}",
             f"precision: {r['precision']:.3f} +- {r['precision_std']:.3f}", f"recall: {r['recall']:.3f} +- {r['recall_std']:.3f}"]
    if "class_entropy" in r:
        parts.append(f"class entropy: {r['class_entropy']:.3f}/{r['class_entropy_max']:.3f}")
        parts.append(f"confidence: {r['confidence']:.3f}")
    if "memorised_fraction" in r:
        parts.append(f"memorised: {100 * r['memorised_fraction']:.1f}% +- {100 * r['memorised_fraction_std']:.1f}%")
    if "class_accuracy" in r:
        parts.append(f"requested-class accuracy: {100 * r['class_accuracy']:.1f}% +- {100 * r['class_accuracy_std']:.1f}%")
    return "  ".join(parts) + f"  ({r['blocks']} blocks of {r['block_size']} samples)"
