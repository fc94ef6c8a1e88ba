"""Input pipelines: TFDS / image-folder data as deterministic, resumable NumPy batches.

The only place in featdiv_jax that imports TensorFlow. TF is used for tf.data on the host CPU
and must never claim accelerator memory that JAX needs, so GPUs are hidden from it on import.
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  # TF was initialised before this import (by the caller); it may already hold a GPU.
  if tf.config.get_visible_devices("GPU"):
    raise RuntimeError("TensorFlow was initialised with a visible GPU before featdiv_jax.data "
                       "was imported; import featdiv_jax.data first so TF stays on the CPU")

# pylint: disable=g-import-not-at-top,wrong-import-position
from featdiv_jax.data.errors import DATASETS, DatasetError
from featdiv_jax.data.pipeline import DatasetInfo, dataset_info, eval_batches, train_batches

__all__ = ["DATASETS", "DatasetError", "DatasetInfo", "dataset_info", "eval_batches",
           "train_batches"]
