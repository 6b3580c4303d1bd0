"""tools/classifier.py: the dataset classifier trains once per dataset, reaches its accuracy, and is cached by a key that follows the data."""

import os

import numpy as np

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
