"""Input pipelines: TFDS / image-folder data as deterministic, resumable NumPy batches.

The only place in featdiv_jax that imports TensorFlow. TF is used for tf.data on the host CPU
and must never claim accelerator memory that JAX needs, so GPUs are hidden from it on import.
"""

import os
import sys
import tempfile

# TensorFlow's C++ start-up notices, some printed on import whatever TF_CPP_MIN_LOG_LEVEL says
# (TF 2.21): oneDNN's, absl's "All log messages before absl::InitializeLog() ...", and the CPU
# feature notice. They are kept off the terminal; anything else TF prints on import is passed on
# to stderr.
_STARTUP_NOTICES = ("oneDNN custom operations are on",
                    "All log messages before absl::InitializeLog() is called",
                    "This TensorFlow binary is optimized to use available CPU instructions",
                    "To enable the following instructions:")


def _import_tensorflow():
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode(errors="replace")
  others = [line for line in text.splitlines()
            if line.strip() and not any(n in line for n in _STARTUP_NOTICES)]
  if others:
    print("\n".join(others), file=sys.stderr, flush=True)
  return tensorflow


tf = _import_tensorflow()

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
