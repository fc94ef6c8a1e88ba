"""Deterministic, resumable, per-process train and eval batches as NumPy arrays.

The train and eval sides are the configured splits, or with dataset.exclude_classes /
holdout_fraction explicit lists of examples (sources.open_view).

Train order: read this process's even share of the split (files shuffled with the seed) ->
shuffle -> repeat -> enumerate -> skip(start_step * local batch) -> load, decode and augment with
stateless randomness keyed by (seed, global element index) -> batch (static shape) -> prefetch.
Everything before the skip is cheap (still-encoded records or file paths), and everything after
it depends only on the element and its index, so resuming at step k replays the uninterrupted
stream exactly.
"""

import dataclasses
import numbers
from typing import Callable, Iterator, Optional, Tuple

import tensorflow as tf

from featdiv_jax.data.errors import DatasetError
from featdiv_jax.data.preprocess import Preprocess, check_int, int_field
from featdiv_jax.data.sources import open_view

AUTOTUNE = tf.data.AUTOTUNE
# The eval split is decoded and resized once and kept in memory (float32) when this process's
# share fits under this size: every evaluation after the first reads no image file. CIFAR-10's
# test split (123 MB) and Flowers-102's validation split (614 MB at 224 px) fit.
EVAL_CACHE_MAX_BYTES = 2 << 30


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


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_batches(dataset_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Endless local batches {"image": float32 (B, S, S, 3), "label": int32 (B,)}.

  Deterministic given (dataset_config, seed, process); starting at `start_step` equals the
  uninterrupted stream with its first `start_step` batches dropped. Every process yields the
  same number of batches per epoch (the split's remainder over processes is dropped).
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

  ds = view.read("train", index=index, count=count, drop_remainder=True, seed=seed)
  ds = ds.shuffle(min(buffer, local_size), seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate().skip(start_step * local_batch)
  seed_t = tf.constant(seed, tf.int64)

  def example(i, ex):
    # A global element index, so processes draw different augmentations.
    key = tf.stack([seed_t, i * count + index])
    return {"image": prep.train(view.encoded(ex["image"]), key),
            "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(example, num_parallel_calls=AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE)
  return ds.with_options(_options()).as_numpy_iterator()


def eval_batches(dataset_config, *, global_batch_size: int,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 side: str = "eval", max_examples: int = 0
                 ) -> Tuple[int, Callable[[], Iterator[dict]]]:
  """(num_batches, make_iterator) over the eval split, each example once over all processes.

  Each make_iterator() yields exactly num_batches local batches {"image", "label", "mask"};
  num_batches is equal on every process, so short shards are padded with mask=False zeros.
  Iterators of one call share a memory cache of the decoded split (EVAL_CACHE_MAX_BYTES).

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
  if sizes[index] * s * s * 3 * 4 <= EVAL_CACHE_MAX_BYTES:
    ds = ds.cache()  # filled by the first evaluation's pass, read by every later one
  filler = tf.data.Dataset.from_tensors({"image": tf.zeros([s, s, 3], tf.float32),
                                         "label": tf.constant(0, tf.int32),
                                         "mask": tf.constant(False)})
  ds = ds.concatenate(filler.repeat(num_batches * local_batch - sizes[index]))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE).with_options(_options())
  return num_batches, ds.as_numpy_iterator
