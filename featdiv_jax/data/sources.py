"""Where examples come from: TFDS builders (the digits one included) and plain image folders.

A source hands the pipeline still-encoded examples `{"image": ref, "label": int64}` for one
process's share of a split, in a deterministic order (or a seeded shuffled one). `encoded(ref)`
turns a ref into image bytes; the pipeline calls it after any resume skip, so skipping never
reads or decodes an image.

A view (`open_view`) is what the pipeline reads: its "train" and "eval" sides are the configured
splits, or, with dataset.exclude_classes / holdout_fraction, explicit lists of examples chosen
from them by a pure function of the config, so every process sees the same lists.
"""

import concurrent.futures
import math
import numbers
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from featdiv_jax.data import digits
from featdiv_jax.data.errors import DATASETS, DatasetError
from featdiv_jax.data.preprocess import config_field, optional_field

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# The first bytes of each format tf.io.decode_image reads, by the extension that names it.
IMAGE_MAGIC = {".bmp": (b"BM", "BMP"), ".gif": (b"GIF8", "GIF"),
               ".jpeg": (b"\xff\xd8\xff", "JPEG"), ".jpg": (b"\xff\xd8\xff", "JPEG"),
               ".png": (b"\x89PNG\r\n\x1a\n", "PNG")}

# Files checked at once: on a remote file system (gs://) each check is a round trip.
CHECK_THREADS = 16
# Class names a bad dataset.exclude_classes message lists.
NAMES_SHOWN = 8
# Stored-order labels of prepared TFDS splits, by (data path, split): prepared data never changes,
# and dataset_info, train_batches and eval_batches each open the source.
_LABELS: Dict[tuple, np.ndarray] = {}


class UnknownSplitError(DatasetError):
  """A split name the data set does not have; the message lists the ones it has."""


def even_range(total: int, index: int, count: int, drop_remainder: bool):
  """(start, size) of part `index` of `count`, exactly as `tfds.even_splits` cuts a split."""
  per, extra = divmod(total, count)
  if drop_remainder:
    return per * index, per
  return per * index + min(index, extra), per + (index < extra)


def open_source(dataset_config):
  """The source a data config names, prepared for reading (or a DatasetError saying why not)."""
  name = getattr(dataset_config, "name", None)
  if name not in DATASETS:
    raise DatasetError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
  data_dir = getattr(dataset_config, "data_dir", None) or None
  if name == "imagefolder":
    return ImageFolderSource(data_dir)
  if name == "digits":
    with digits.quietly():
      builder = digits.SklearnDigits(data_dir=data_dir)
      if not builder.is_prepared():
        # Nothing to download (the data ships with scikit-learn); skip TFDS's GCS lookup, which
        # would need the network.
        prepare_once(builder,
                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  else:
    builder = tfds.builder(name, data_dir=data_dir)
    _prepare(builder, name, bool(getattr(dataset_config, "download", False)))
  return TfdsSource(builder)


def prepare_once(builder, **kwargs) -> None:
  """`download_and_prepare` that tolerates another process finishing the same data dir first.

  Processes of a multi-host job (or runs sharing a data dir) may prepare it at once; TFDS then
  fails the later rename with FileExistsError although the data set is complete.
  """
  try:
    builder.download_and_prepare(**kwargs)
  except FileExistsError:
    if not builder.is_prepared():
      raise


def download_and_prepare(name: str, data_dir: Optional[str] = None) -> None:
  """Downloads and prepares TFDS data set `name` into `data_dir` (needs the network); a
  data set already prepared there is left as it is. Raises DatasetError naming what failed."""
  _prepare(tfds.builder(name, data_dir=data_dir or None), name, download=True)


def _tfds_mocked() -> bool:
  # Under tfds.testing.mock_data nothing is ever prepared and download_and_prepare is a no-op.
  fn = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(fn, "__qualname__", "").startswith("mock_data.")


def _prepare(builder, name: str, download: bool):
  if builder.is_prepared() or _tfds_mocked():
    return
  root = os.fspath(builder.data_dir_root)
  how = (f"On a machine with network access run `tfds build {name} --data_dir=DIR`, then copy "
         f"DIR/{name} to {os.path.join(root, name)}")
  if not download:
    raise DatasetError(f"dataset {name!r} is not prepared in data dir {root!r} and "
                       f"dataset.download is False. {how}, or pass "
                       "--config.dataset.download=True to download it here.")
  try:
    prepare_once(builder)
  except (OSError, tfds.download.DownloadError, ImportError) as e:  # requests errors are OSErrors
    raise DatasetError(f"could not download and prepare {name!r} into data dir {root!r}: "
                       f"{type(e).__name__}: {e}. {how}.") from e


class TfdsSource:
  """A TFDS builder read with `SkipDecoding`, so refs are the stored image bytes."""

  def __init__(self, builder):
    self._builder = builder
    self.name = builder.name
    self.num_classes = builder.info.features["label"].num_classes
    self.class_names = list(builder.info.features["label"].names)
    # (H, W, C) with None where images differ (dataset.cache="auto" reads it).
    self.image_shape = tuple(builder.info.features["image"].shape)
    # Empty under tfds.testing.mock_data: sizes then come from what the reader yields, and
    # sharding is done here, because the mock ignores sub-splits (every one holds everything).
    self._known = bool(builder.info.splits)

  def split_size(self, split: str) -> int:
    if self._known:
      return self._split_info(split).num_examples
    n = int(self._dataset(split, None).cardinality())
    if n < 0:  # unknown cardinality: count (only reached under mocks, which are small)
      n = int(self._dataset(split, None).reduce(0, lambda c, _: c + 1))
    return n

  def shard_sizes(self, split: str, count: int, drop_remainder: bool) -> List[int]:
    if self._known:
      self._split_info(split)  # validates the name first
      return [self._builder.info.splits[s].num_examples
              for s in tfds.even_splits(split, n=count, drop_remainder=drop_remainder)]
    total = self.split_size(split)
    return [even_range(total, i, count, drop_remainder)[1] for i in range(count)]

  def read(self, split: str, *, index: int, count: int, drop_remainder: bool,
           seed: Optional[int]) -> tf.data.Dataset:
    """This process's part of `split`; `seed` shuffles the files (into the same order every
    epoch: the pipeline's buffer reshuffles), None keeps the stored order."""
    if self._known:
      part = tfds.even_splits(split, n=count, drop_remainder=drop_remainder)[index]
      ds = self._dataset(part, seed)
    else:
      start, size = even_range(self.split_size(split), index, count, drop_remainder)
      ds = self._dataset(split, seed).skip(start).take(size)
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  def read_all(self, split: str) -> tf.data.Dataset:
    """The whole split in its stored order (the order `labels` gives)."""
    return self._dataset(split, None).map(lambda ex: {"image": ex["image"], "label": ex["label"]})

  def labels(self, split: str) -> np.ndarray:
    """int64 labels of `split` in stored order (reads every record once, decodes no image)."""
    if self._known:
      self._split_info(split)  # validates the name first
      key = (os.fspath(self._builder.data_dir), split)
      if key not in _LABELS:
        _LABELS[key] = self._read_labels(split)
      return _LABELS[key]
    return self._read_labels(split)

  def _read_labels(self, split: str) -> np.ndarray:
    ds = self._dataset(split, None).map(lambda ex: ex["label"], num_parallel_calls=tf.data.AUTOTUNE)
    parts = list(ds.batch(8192).as_numpy_iterator())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros([0], np.int64)

  def encoded(self, ref: tf.Tensor) -> tf.Tensor:
    return ref

  def _split_info(self, split: str):
    try:
      return self._builder.info.splits[split]
    except (KeyError, ValueError, TypeError):
      raise UnknownSplitError(
          f"unknown split {split!r} for dataset {self.name!r}; available splits: "
          f"{', '.join(self._builder.info.splits)} (sub-splits like 'train[:90%]' also work)"
      ) from None

  def _dataset(self, split, seed: Optional[int]) -> tf.data.Dataset:
    return self._builder.as_dataset(
        split=split, shuffle_files=seed is not None,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False))


class ImageFolderSource:
  """root/<split>/<class>/<image>: classes are the sorted class-folder names of all splits.

  Not `tfds.ImageFolder`: that one shuffles files without a seed, has no sub-splits, and
  decodes to a fixed channel count; here refs are file paths, read after any resume skip.
  A split's files are checked (readable, image header) when it is first listed.
  """

  def __init__(self, root: Optional[str]):
    if not root:
      raise DatasetError("dataset 'imagefolder' needs dataset.data_dir: a folder holding one "
                         "sub-folder per split, each with one sub-folder per class")
    if not tf.io.gfile.isdir(root):
      raise DatasetError(f"image folder root {root!r} does not exist (expected "
                         f"{os.path.join(root, '<split>', '<class>', '<image>')})")
    self.name = "imagefolder"
    self._root = root
    self.splits = _subfolders(root)
    self.classes = sorted({c for s in self.splits for c in _subfolders(os.path.join(root, s))})
    self.num_classes = len(self.classes)
    self.class_names = self.classes
    self.image_shape = None  # files of any size
    self._files = {}

  def split_size(self, split: str) -> int:
    return len(self._list(split)[0])

  def shard_sizes(self, split: str, count: int, drop_remainder: bool) -> List[int]:
    total = self.split_size(split)
    return [even_range(total, i, count, drop_remainder)[1] for i in range(count)]

  def read(self, split: str, *, index: int, count: int, drop_remainder: bool,
           seed: Optional[int]) -> tf.data.Dataset:
    paths, labels = self._list(split)
    start, size = even_range(len(paths), index, count, drop_remainder)
    ds = tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(paths[start:start + size], tf.string),
        "label": tf.constant(labels[start:start + size], tf.int64)})
    if seed is not None:
      # Files are listed class by class; only a full shuffle of the (cheap) paths mixes them
      # whatever the pipeline's shuffle buffer. One order for every epoch, so that a decoded
      # cache of this stream holds what it would yield (the pipeline's buffer reshuffles).
      ds = ds.shuffle(max(size, 1), seed=seed, reshuffle_each_iteration=False)
    return ds

  def refs(self, split: str) -> List[str]:
    """The split's file paths in listing order (the order `labels` gives)."""
    return self._list(split)[0]

  def labels(self, split: str) -> np.ndarray:
    return np.asarray(self._list(split)[1], np.int64)

  def encoded(self, ref: tf.Tensor) -> tf.Tensor:
    return tf.io.read_file(ref)

  def _list(self, split: str):
    if split not in self._files:
      folder = os.path.join(self._root, str(split))
      if split not in self.splits:
        raise UnknownSplitError(f"split {split!r} not found: no folder {folder!r}; splits found "
                                f"in {self._root!r}: {', '.join(self.splits) or 'none'}")
      paths, labels = [], []
      for label, name in enumerate(self.classes):
        class_dir = os.path.join(folder, name)
        if tf.io.gfile.isdir(class_dir):
          files = sorted(f for f in _listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
          paths += [os.path.join(class_dir, f) for f in files]
          labels += [label] * len(files)
      check_images(paths)
      self._files[split] = (paths, labels)
    return self._files[split]


def _listdir(path: str) -> List[str]:
  try:
    return tf.io.gfile.listdir(path)
  except tf.errors.OpError as e:  # e.g. a folder without read permission
    raise DatasetError(f"image folder {path!r} cannot be listed: {e.message}") from None


def _subfolders(path: str) -> List[str]:
  return sorted(f.rstrip("/") for f in _listdir(path) if tf.io.gfile.isdir(os.path.join(path, f)))


def check_image(path: str) -> None:
  """Raises DatasetError unless `path` can be read and starts like an image.

  A cheap check of the first bytes, so a stray text file or an unreadable file is reported
  when the source is opened, not as a tf.data error mid-run. Any of the known formats is
  accepted whatever the extension (decode_image looks at the bytes, not the name); a file with
  a valid header but a damaged body still fails only when it is decoded.
  """
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      head = f.read(8)
  except (tf.errors.OpError, OSError) as e:
    reason = e.message if isinstance(e, tf.errors.OpError) else str(e)
    raise DatasetError(f"image file {path!r} cannot be read: {reason}") from None
  magic, kind = IMAGE_MAGIC["." + path.rsplit(".", 1)[-1].lower()]  # listed by extension
  if not any(head.startswith(m) for m, _ in IMAGE_MAGIC.values()):
    raise DatasetError(f"image file {path!r} is not an image: a {kind} file starts with "
                       f"{magic!r}, this one with {head!r}; remove it or replace it with a "
                       f"{'/'.join(sorted({k for _, k in IMAGE_MAGIC.values()}))} image")


def check_images(paths: List[str]) -> None:
  """check_image on every path; the error is the first bad file in list order."""
  if not paths or "://" not in paths[0]:
    # Local files: 10,000 are checked in 0.1 s; threads would only add overhead (0.4 s).
    for path in paths:
      check_image(path)
    return
  with concurrent.futures.ThreadPoolExecutor(min(CHECK_THREADS, len(paths))) as pool:
    for _ in pool.map(check_image, paths):
      pass


# --- views: what the pipeline reads as its "train" and "eval" sides --------------------------

SIDES = ("train", "eval")


def open_view(dataset_config):
  """The train and eval sides a data config describes, ready to read.

  Without dataset.exclude_classes and dataset.holdout_fraction each side is a split of the
  source (SplitView, read as it is stored). With either, each side is an explicit list of the
  source's examples (SelectedView).
  """
  source = open_source(dataset_config)
  splits = {side: config_field(dataset_config, f"{side}_split") for side in SIDES}
  excluded = optional_field(dataset_config, "exclude_classes", ())
  fraction = optional_field(dataset_config, "holdout_fraction", 0.0)
  seed = optional_field(dataset_config, "holdout_seed", 0)
  if isinstance(excluded, (str, bytes)) or not isinstance(excluded, (tuple, list)):
    raise DatasetError(f"dataset.exclude_classes must be a tuple of class names or indices, got "
                       f"{excluded!r}")
  if (not isinstance(fraction, numbers.Real) or isinstance(fraction, bool)
      or not 0 <= fraction < 1):
    raise DatasetError(f"dataset.holdout_fraction must be a number in [0, 1) (0: off), got "
                       f"{fraction!r}")
  if (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)
      or not -2**63 <= seed < 2**63):
    raise DatasetError(f"dataset.holdout_seed must be a 64-bit integer, got {seed!r}")
  if not excluded and fraction == 0:
    return SplitView(source, splits)
  return SelectedView(source, splits, excluded_classes(source, excluded), float(fraction),
                      int(seed))


def excluded_classes(source, excluded) -> List[int]:
  """Sorted class indices of dataset.exclude_classes (names or indices), checked."""
  names = source.class_names
  n = len(names)
  out = set()
  for value in excluded:
    if isinstance(value, str) and value in names:
      out.add(names.index(value))
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < n:
      out.add(int(value))
    else:
      close = [c for c in names if isinstance(value, str) and c.lower() == value.lower()]
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      shown = ", ".join(repr(c) for c in names[:NAMES_SHOWN]) + (", ..." if n > NAMES_SHOWN else "")
      raise DatasetError(
          f"dataset.exclude_classes: {value!r} is not a class of {source.name!r}{hint}; valid: "
          f"its {n} class names ({shown}) or indices 0..{n - 1}")
  if len(out) == n:
    raise DatasetError(f"dataset.exclude_classes={tuple(excluded)!r} drops all {n} classes of "
                       f"{source.name!r}; keep at least one")
  return sorted(out)


def holdout(total: int, fraction: float, seed: int):
  """(train, eval): sorted positions in range(total), eval round(fraction * total) of them.

  Rounding is half up (floor(f * total + 0.5)). The eval positions are those with the smallest
  splitmix64 keys of (seed, position): a pure function of (total, fraction, seed), the same on
  every process and with every NumPy version, like torch's `random_split` of the whole set.
  """
  num_eval = int(math.floor(fraction * total + 0.5))
  if not 0 < num_eval < total:
    raise DatasetError(
        f"dataset.holdout_fraction={fraction!r} holds out round({fraction!r} x {total}) = "
        f"{num_eval} of the {total} examples; both parts need at least one, so use a fraction "
        f"in [{0.5 / total:.4g}, {1 - 0.5 / total:.4g})")
  keys = _splitmix64(_splitmix64(np.full(total, seed % 2**64, np.uint64))
                     ^ np.arange(total, dtype=np.uint64))
  order = np.argsort(keys, kind="stable")
  return np.sort(order[num_eval:]), np.sort(order[:num_eval])


def _splitmix64(x: np.ndarray) -> np.ndarray:
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SplitView:
  """Each side is the split its config field names, read as the source stores it."""

  def __init__(self, source, splits: Dict[str, str]):
    self.source, self.splits = source, splits
    self.name, self.num_classes, self.encoded = source.name, source.num_classes, source.encoded
    self.image_shape = source.image_shape

  def describe(self, side: str) -> str:
    return f"{side} split {self.splits[side]!r} of {self.name!r}"

  def size(self, side: str) -> int:
    return int(self._checked(side, self.source.split_size))

  def shard_sizes(self, side: str, count: int, drop_remainder: bool) -> List[int]:
    return self._checked(side, lambda s: self.source.shard_sizes(s, count, drop_remainder))

  def read(self, side: str, **kwargs) -> tf.data.Dataset:
    return self._checked(side, lambda s: self.source.read(s, **kwargs))

  def _checked(self, side, fn):
    try:
      return fn(self.splits[side])
    except UnknownSplitError as e:  # say which config field holds the unknown name
      raise DatasetError(f"dataset.{side}_split={self.splits[side]!r} is invalid: {e}") from None


class SelectedView:
  """Each side is an explicit list of examples: dataset.exclude_classes and holdout_fraction.

  Examples are numbered by a global id: the position in the stored order of train_split, then
  of eval_split (if it is another split). Dropped classes go from both sides and the kept ones
  are renumbered 0..N-1 in their order. holdout_fraction > 0 splits the kept examples of both
  splits together (`holdout`; a split named twice counts once). A side's ids are kept sorted
  and each process reads its even share, a contiguous range of them, as SplitView does a split.
  """

  def __init__(self, source, splits: Dict[str, str], excluded: List[int], fraction: float,
               seed: int):
    self.source, self.splits = source, splits
    self.name, self.encoded, self.image_shape = source.name, source.encoded, source.image_shape
    self.num_classes = source.num_classes - len(excluded)
    labels, self._spans, offset = [], {}, 0  # split -> (first global id, size)
    for side in SIDES:
      split = splits[side]
      if split not in self._spans:
        try:
          labels.append(source.labels(split))
        except UnknownSplitError as e:
          raise DatasetError(f"dataset.{side}_split={split!r} is invalid: {e}") from None
        self._spans[split] = (offset, len(labels[-1]))
        offset += len(labels[-1])
    remap = np.full(source.num_classes, -1, np.int64)
    kept_classes = np.setdiff1d(np.arange(source.num_classes), excluded)
    remap[kept_classes] = np.arange(len(kept_classes))
    self._labels = remap[np.concatenate(labels)]  # by global id; -1: dropped
    kept = np.flatnonzero(self._labels >= 0)
    if fraction:
      train, held = holdout(len(kept), fraction, seed)
      self._ids = {"train": kept[train], "eval": kept[held]}
      self._how = f"dataset.holdout_fraction={fraction!r} (holdout_seed={seed})"
    else:
      self._ids = {}
      for side in SIDES:
        first, n = self._spans[splits[side]]
        self._ids[side] = kept[(kept >= first) & (kept < first + n)]
      self._how = f"dataset.exclude_classes ({len(excluded)} classes dropped)"

  def describe(self, side: str) -> str:
    return f"the {side} side of {self.name!r} after {self._how}"

  def size(self, side: str) -> int:
    return len(self._ids[side])

  def shard_sizes(self, side: str, count: int, drop_remainder: bool) -> List[int]:
    return [even_range(self.size(side), i, count, drop_remainder)[1] for i in range(count)]

  def read(self, side: str, *, index: int, count: int, drop_remainder: bool,
           seed: Optional[int]) -> tf.data.Dataset:
    """This process's share of `side`: sorted ids for cheap refs (file paths, shuffled in full
    with `seed`), else the stored records filtered by id (in stored order)."""
    start, size = even_range(self.size(side), index, count, drop_remainder)
    mine = self._ids[side][start:start + size]
    if hasattr(self.source, "refs"):
      refs = np.concatenate([np.asarray(self.source.refs(s), object) for s in self._spans])
      ds = tf.data.Dataset.from_tensor_slices({
          "image": tf.constant([str(r) for r in refs[mine]], tf.string),
          "label": tf.constant(self._labels[mine], tf.int64)})
      if seed is not None:  # one order for every epoch, as ImageFolderSource.read
        ds = ds.shuffle(max(size, 1), seed=seed, reshuffle_each_iteration=False)
      return ds
    member = np.zeros(len(self._labels), bool)
    member[mine] = True
    streams = [self.source.read_all(split).enumerate(start=offset)
               for split, (offset, n) in self._spans.items() if member[offset:offset + n].any()]
    if not streams:  # an empty share: a stream of the right structure that reads nothing
      split, (offset, _) = next(iter(self._spans.items()))
      streams = [self.source.read_all(split).take(0).enumerate(start=offset)]
    ds = streams[0]
    for other in streams[1:]:
      ds = ds.concatenate(other)
    member_t, labels_t = tf.constant(member), tf.constant(self._labels)
    ds = ds.filter(lambda i, ex: tf.gather(member_t, i))
    return ds.map(lambda i, ex: {"image": ex["image"], "label": tf.gather(labels_t, i)})
