"""`sklearn_digits`: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

The project's default data set: 1,797 real images that ship inside scikit-learn, so it prepares
offline in seconds and goes through exactly the same TFDS reading path as CIFAR-10 or Flowers.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360           # 20% of 1,797 (the rest, 1,437, is 'train')
SPLIT_SEED = 20240607    # fixed: the split must never change between runs or machines


def split_indices():
  """{'train': indices, 'test': indices} into `load_digits()`, from a fixed permutation."""
  order = np.random.default_rng(SPLIT_SEED).permutation(1797)
  return {"train": np.sort(order[NUM_TEST:]), "test": np.sort(order[:NUM_TEST])}


def to_uint8(images):
  """sklearn's 0..16 intensities -> 0..255, as an 8-bit image file would hold them."""
  return np.round(np.asarray(images, np.float64) * 255.0 / 16.0).astype(np.uint8)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's `load_digits()`: 8x8 grayscale digits 0-9, split 1,437 / 360."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("scikit-learn's 8x8 handwritten digits (UCI optdigits test set), "
                     "pixels scaled from 0..16 to 0..255."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with scikit-learn
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = to_uint8(digits.images)[..., None]
    for i in indices:
      yield int(i), {"image": images[i], "label": int(digits.target[i])}
