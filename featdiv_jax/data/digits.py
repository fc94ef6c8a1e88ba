"""`sklearn_digits`: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

The project's default data set: 1,797 real images that ship inside scikit-learn, so it prepares
offline in seconds and goes through exactly the same TFDS reading path as CIFAR-10 or Flowers.
"""

import contextlib
import logging

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

  # Preparing takes a second and needs no attention: TFDS's bold notices and progress bars, and
  # its warning about the not-yet-written folder, go to the log (featdiv_jax.console), not the
  # terminal.
  def _log_download_bytes(self):
    logging.info("preparing %s in %s (first use, a few seconds)", self.name, self.data_dir)

  def _log_download_done(self):
    logging.info("prepared %s in %s", self.name, self.data_dir)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with scikit-learn
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = to_uint8(digits.images)[..., None]
    for i in indices:
      yield int(i), {"image": images[i], "label": int(digits.target[i])}


@contextlib.contextmanager
def quietly():
  """Within it, TFDS shows no progress bar and logs its folder warnings at INFO."""
  demote = _DemoteFolderWarnings()
  logger = logging.getLogger("absl")
  tfds.display_progress_bar(False)
  logger.addFilter(demote)
  try:
    yield
  finally:
    logger.removeFilter(demote)
    tfds.display_progress_bar(True)


class _DemoteFolderWarnings(logging.Filter):
  """TFDS warns 'Variant folder ... has no dataset_info.json' about the folder it is preparing."""

  def filter(self, record):
    if record.levelno == logging.WARNING and str(record.msg).startswith("Variant folder"):
      record.levelno, record.levelname = logging.INFO, "INFO"
    return True
