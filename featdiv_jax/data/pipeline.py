"""Deterministic, resumable, per-process train and eval batches as NumPy arrays.

The train and eval sides are the configured splits, or with dataset.exclude_classes /
holdout_fraction explicit lists of examples (sources.open_view).

Train order: read this process's even share of the split (files, or file paths, in one seeded
order) [-> decode and resize -> cache in memory] -> shuffle (reshuffled each epoch) -> repeat ->
enumerate -> skip(start_step * local batch) -> [load, decode and resize ->] augment with
stateless randomness keyed by (seed, global element index) -> batch (static shape) -> prefetch.
Where every decoded image has one size (digits, CIFAR-10) the batch is formed first and augmented
as a whole, its randomness keyed by its first element's index: the same stream properties at a
third of the CPU time per image.
Without the cache everything before the skip is cheap (still-encoded records or file paths); with
it the decoded images are read from memory after the first epoch. Both streams hold the same
elements in the same order, and everything after the skip depends only on the element and its
index, so resuming at step k replays the uninterrupted stream exactly, and `dataset.cache`
changes no batch.

Images are uint8 (S, S, 3) pixels: a quarter of float32's bytes to copy and transfer; the
training and eval steps normalise them on the device (`steps.normalize_images`).
"""

import dataclasses
import numbers
import time
from typing import Callable, Iterator, Optional, Tuple

import tensorflow as tf
from absl import logging

from featdiv_jax.data.errors import CACHE_MODES, DatasetError
from featdiv_jax.data.preprocess import Preprocess, check_int, int_field, optional_field
from featdiv_jax.data.sources import open_view

AUTOTUNE = tf.data.AUTOTUNE
# dataset.cache="auto" keeps a side's decoded images in memory when this process's share is
# estimated to fit under this size (train: the resized images before any crop, counted at up to
# 2:1 aspect; eval: the uint8 crops). At their resize sizes CIFAR-10's train split (150 MB),
# Caltech-101's (1.2 GB at most for 3,060 images at 256 px) and Flowers-102's fit.
CACHE_MAX_BYTES = 4 << 30
ASPECT_ALLOWANCE = 2  # a resized image's longer side, at most, in shorter sides (auto's estimate)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int  # what remains after dataset.exclude_classes (labels are 0..num_classes-1)
  # Examples of the train and eval sides, all processes together: dataset.train_split and
  # eval_split, less the excluded classes; with dataset.holdout_fraction > 0 the two parts of
  # their union.
  train_size: int
  eval_size: int


def dataset_info(dataset_config) -> DatasetInfo:
  """Class count and split sizes; prepares the data set first if it needs to (and may)."""
  view = open_view(dataset_config)
  return DatasetInfo(num_classes=int(view.num_classes), train_size=view.size("train"),
                     eval_size=view.size("eval"))


def _processes(global_batch_size, process_index, process_count) -> Tuple[int, int, int]:
  """(process_index, process_count, local batch size), checked."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  count = check_int(process_count, "process_count", 1)
  index = check_int(process_index, "process_index", 0)
  if index >= count:
    raise DatasetError(f"process_index must be in [0, {count}), got {index}")
  batch = check_int(global_batch_size, "global_batch_size", 1)
  if batch % count:
    raise DatasetError(f"global_batch_size {batch} is not divisible by process_count {count}; "
                       f"use a multiple of {count}")
  return index, count, batch // count


def cache_mode(dataset_config) -> str:
  """dataset.cache, checked (configs saved before the field read as "auto")."""
  mode = optional_field(dataset_config, "cache", "auto")
  if mode not in CACHE_MODES:
    raise DatasetError(f"dataset.cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
  return mode


def _cached(mode: str, image_bytes: Optional[int], examples: int) -> bool:
  """Whether a side whose decoded images take about `image_bytes` each (None: unknown) is
  cached under `mode`."""
  if mode != "auto":
    return mode == "memory"
  return image_bytes is not None and examples * image_bytes <= CACHE_MAX_BYTES


def decoded_image_bytes(prep: Preprocess, view) -> Optional[int]:
  """auto's estimate of one decoded, resized train image's bytes; None when neither the resize
  nor the source fixes its size (an image folder without dataset.resize_size)."""
  if prep.resize_size:
    return prep.resize_size ** 2 * ASPECT_ALLOWANCE * 3
  shape = view.image_shape
  if shape is None or None in shape[:2]:
    return None
  return int(shape[0]) * int(shape[1]) * 3


def fill(ds: tf.data.Dataset, what: str) -> None:
  """Reads `ds`, whose last transformation is an in-memory `cache()`, once to the end, so that
  every iterator made from it afterwards reads memory (tf.data shares the cache between them)
  and none is left with a half-written cache when a run stops mid-epoch."""
  start = time.perf_counter()
  count, size = ds.reduce((tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
                          lambda acc, ex: (acc[0] + 1, acc[1] + tf.size(ex["image"],
                                                                        tf.int64)))
  logging.info("dataset.cache: %d decoded images of %s in memory (%.1f MiB) in %.1f s",
               int(count), what, int(size) / 2**20, time.perf_counter() - start)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_batches(dataset_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Endless local batches {"image": uint8 (B, S, S, 3), "label": int32 (B,)}.

  Deterministic given (dataset_config, seed, process), with or without `dataset.cache`; starting
  at `start_step` equals the uninterrupted stream with its first `start_step` batches dropped.
  Every process yields the same number of batches per epoch (the split's remainder over
  processes is dropped).
  """
  index, count, local_batch = _processes(global_batch_size, process_index, process_count)
  if not isinstance(seed, numbers.Integral) or not -2**63 <= seed < 2**63:
    raise DatasetError(f"seed must be a 64-bit integer, got {seed!r}")
  start_step = check_int(start_step, "start_step", 0)
  prep = Preprocess.from_config(dataset_config)
  buffer = int_field(dataset_config, "shuffle_buffer", 1)
  view = open_view(dataset_config)
  local_size = view.shard_sizes("train", count, drop_remainder=True)[index]
  if local_size == 0:
    raise DatasetError(f"{view.describe('train')} has {view.size('train')} examples, too few "
                       f"to give each of {count} processes one")

  cached = _cached(cache_mode(dataset_config), decoded_image_bytes(prep, view), local_size)
  # One decoded size for every image (digits, CIFAR-10): augmented a batch at a time.
  static = prep.static_decoded_shape(view.image_shape)
  decoded_shape = [*static, 3] if static else [None, None, 3]

  def decoded(ex):
    return {"image": tf.ensure_shape(prep.decoded(view.encoded(ex["image"])), decoded_shape),
            "label": tf.cast(ex["label"], tf.int32)}

  ds = view.read("train", index=index, count=count, drop_remainder=True, seed=seed)
  if cached:
    ds = ds.map(decoded, num_parallel_calls=AUTOTUNE).cache()
    fill(ds, view.describe("train"))
  ds = ds.shuffle(min(buffer, local_size), seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate().skip(start_step * local_batch)
  seed_t = tf.constant(seed, tf.int64)

  def key(i):  # a global element index, so processes draw different augmentations
    return tf.stack([seed_t, i * count + index])

  if static:
    if not cached:
      ds = ds.map(lambda i, ex: (i, decoded(ex)), num_parallel_calls=AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).map(
        lambda i, ex: {"image": prep.augment_batch(ex["image"], key(i[0])), "label": ex["label"]},
        num_parallel_calls=AUTOTUNE)
  else:
    def example(i, ex):
      ex = ex if cached else decoded(ex)
      return {"image": prep.augment(ex["image"], key(i)), "label": ex["label"]}
    ds = ds.map(example, num_parallel_calls=AUTOTUNE).batch(local_batch, drop_remainder=True)
  return ds.prefetch(AUTOTUNE).with_options(_options()).as_numpy_iterator()


def eval_batches(dataset_config, *, global_batch_size: int,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 side: str = "eval", max_examples: int = 0
                 ) -> Tuple[int, Callable[[], Iterator[dict]]]:
  """(num_batches, make_iterator) over the eval split, each example once over all processes.

  Each make_iterator() yields exactly num_batches local batches {"image": uint8, "label",
  "mask"}; num_batches is equal on every process, so short shards are padded with mask=False
  zeros. Iterators of one call share a memory cache of the split's uint8 crops, as
  `dataset.cache` says (auto: when this process's share fits under CACHE_MAX_BYTES).

  `side="train"` reads the train split the same way (eval preprocessing: no augmentation), for
  the heads' linear probes. `max_examples` > 0 keeps about that many examples, evenly spread
  over the split's stored order (every ceil(size / max_examples)-th one, in each process's
  part), so a split stored class by class still gives every class.
  """
  index, count, local_batch = _processes(global_batch_size, process_index, process_count)
  if side not in ("train", "eval"):
    raise DatasetError(f"side {side!r}; valid: train, eval")
  max_examples = check_int(max_examples, "max_examples", 0)
  prep = Preprocess.from_config(dataset_config)
  view = open_view(dataset_config)
  sizes = view.shard_sizes(side, count, drop_remainder=False)
  stride = max(1, -(-sum(sizes) // max_examples)) if max_examples else 1
  sizes = [-(-size // stride) for size in sizes]
  num_batches = -(-max(sizes) // local_batch)

  ds = view.read(side, index=index, count=count, drop_remainder=False, seed=None)
  if stride > 1:
    ds = ds.shard(stride, 0)
  ds = ds.map(lambda ex: {"image": prep.eval(view.encoded(ex["image"])),
                          "label": tf.cast(ex["label"], tf.int32),
                          "mask": tf.constant(True)},
              num_parallel_calls=AUTOTUNE)
  s = prep.image_size
  if _cached(cache_mode(dataset_config), s * s * 3, sizes[index]):
    ds = ds.cache()  # filled by the first evaluation's pass, read by every later one
  filler = tf.data.Dataset.from_tensors({"image": tf.zeros([s, s, 3], tf.uint8),
                                         "label": tf.constant(0, tf.int32),
                                         "mask": tf.constant(False)})
  ds = ds.concatenate(filler.repeat(num_batches * local_batch - sizes[index]))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE).with_options(_options())
  return num_batches, ds.as_numpy_iterator
