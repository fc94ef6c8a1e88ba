"""Image files named on a command line, preprocessed exactly as a run's eval pipeline does.

For `featdiv_jax.predict`: `check_image_files` reads and decodes every file first, so that a
bad one is one error naming it before anything is computed; `eval_image_batches` then reads them
through tf.data with the eval pipeline's own per-example preprocessing (`Preprocess.eval`), in
fixed-size batches.
"""

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from featdiv_jax.data.errors import DatasetError
from featdiv_jax.data.preprocess import Preprocess
from featdiv_jax.data.sources import IMAGE_MAGIC

KINDS = "/".join(sorted({kind for _, kind in IMAGE_MAGIC.values()}))


def check_image_files(paths: Sequence[str]) -> None:
  """Raises DatasetError `<path>: <why>` for the first of `paths` that cannot be read, does not
  start like an image or does not decode (a damaged or truncated file) as the pipeline decodes
  it. What TensorFlow logs while decoding (libjpeg's 'Premature end of JPEG data') is dropped
  with the error, and passed on to stderr when every file decodes."""
  with _stderr_kept_back():
    for path in paths:
      try:
        with open(path, "rb") as f:
          encoded = f.read()
      except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e.strerror or e})") from None
      if not encoded.startswith(tuple(magic for magic, _ in IMAGE_MAGIC.values())):
        raise DatasetError(f"{path}: not an image (a {KINDS} file); it starts with "
                           f"{encoded[:8]!r}")
      try:
        # Under an explicit device scope the failed op's rendezvous is not aborted a second
        # time at exit, which TensorFlow (2.21) logs after the error line otherwise.
        with tf.device("/CPU:0"):
          tf.io.decode_image(encoded, channels=3, expand_animations=False)
      except tf.errors.OpError as e:
        reason = e.message.split("}}")[-1].split(" [Op:")[0].strip()
        raise DatasetError(f"{path}: a damaged image that does not decode ({reason})") from None


@contextlib.contextmanager
def _stderr_kept_back():
  """Holds back what is written to file descriptor 2 (TensorFlow's C++ log) within it: passed on
  to sys.stderr when the block ends normally, dropped when it raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    captured.seek(0)
    text = captured.read().decode(errors="replace").strip()
  if text:
    print(text, file=sys.stderr, flush=True)


def eval_image_batches(dataset_config, paths: Sequence[str], batch_size: int
                       ) -> Iterator[np.ndarray]:
  """uint8 (batch_size, S, S, 3) batches of the files at `paths`, in order, each preprocessed as
  the eval pipeline preprocesses an example of the data config (`Preprocess.eval`: decode
  [-> grayscale] -> resize the shorter side -> uint8 -> center crop); the last batch is padded
  with zero images."""
  prep = Preprocess.from_config(dataset_config)
  s = prep.image_size
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), tf.string))
  ds = ds.map(lambda path: prep.eval(tf.io.read_file(path)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  filler = tf.data.Dataset.from_tensors(tf.zeros([s, s, 3], tf.uint8))
  ds = ds.concatenate(filler.repeat(-len(paths) % batch_size))
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
