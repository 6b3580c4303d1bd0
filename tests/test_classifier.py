"""tools/classifier.py: the dataset classifier trains once per dataset, reaches its accuracy, and is cached by a key that follows the data."""

import os

import numpy as np
import torch

from tools import classifier
from tools.config import load_config
from tools.data import load_dataset


def test_classifier_trains_once_reaches_97_percent_and_is_cached(digits_cfg):
    logs = []
    model = classifier.load_or_train(digits_cfg, log=logs.append)
    path = os.path.join(digits_cfg["data"]["cache"], "metric-classifiers", f"{model.tag}.pt")
    assert os.path.isfile(path)  # trained by the first test to use the shared cache, this one or another
    assert model.test_accuracy >= 0.97, model.test_accuracy
    test_images, test_labels = load_dataset(digits_cfg, "test")
    assert classifier.accuracy(model, test_images, test_labels) == model.test_accuracy  # the figure is reproducible
    logs.clear()
    again = classifier.load_or_train(digits_cfg, log=logs.append)
    assert logs == [] and again.tag == model.tag  # loaded from the cache, not retrained
    x = test_images[:50]
    assert np.array_equal(classifier.outputs(again, x)[0], classifier.outputs(model, x)[0])


def test_classifier_cache_key_follows_the_data(digits_cfg):
    """Other data (here: another resolution of digits) gets another classifier file."""
    tag = classifier.load_or_train(digits_cfg, log=lambda *_: None).tag
    cfg8 = load_config("config/digits/E.yaml", [f"data.cache={digits_cfg['data']['cache']}", "network.img_resolution=8",
                                                 "network.channel_mult=[1,2]", "network.attn_resolutions=[4]"])
    images, labels = load_dataset(cfg8, "train")
    assert classifier._fingerprint(images, labels) not in tag


def test_classifier_cache_key_changes_with_any_image_or_label():
    """The key is the same for the same data (in any memory layout and label dtype) and changes with one pixel of one
    image, one label, or the label set: a cached classifier is never reused for data it was not trained on."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 1, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(200) % 10
    key = classifier._fingerprint(images, labels)
    assert classifier._fingerprint(images.clone().to(memory_format=torch.channels_last), labels.to(torch.int32)) == key

    one_pixel = images.clone()
    one_pixel[len(images) // 2, 0, 8, 8] ^= 1
    one_label = labels.clone()
    one_label[-1] = (one_label[-1] + 1) % 10
    swapped = labels.clone()  # the same label counts, two images' labels (0 and 1) exchanged
    swapped[[0, 1]] = labels[[1, 0]]
    fewer_classes = labels % 5  # the label set {0..4} instead of {0..9}
    changed = {classifier._fingerprint(one_pixel, labels), classifier._fingerprint(images, one_label),
               classifier._fingerprint(images, swapped), classifier._fingerprint(images, fewer_classes)}
    assert len(changed) == 4 and key not in changed
