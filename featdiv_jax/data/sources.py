"""Where examples come from: TFDS builders (the digits one included) and plain image folders.

A source hands the pipeline still-encoded examples `{"image": ref, "label": int64}` for one
process's share of a split, in a deterministic order (or a seeded shuffled one). `encoded(ref)`
turns a ref into image bytes; the pipeline calls it after any resume skip, so skipping never
reads or decodes an image.
"""

import concurrent.futures
import os
from typing import List, Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from featdiv_jax.data.digits import SklearnDigits
from featdiv_jax.data.errors import DATASETS, DatasetError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# The first bytes of each format tf.io.decode_image reads, by the extension that names it.
IMAGE_MAGIC = {".bmp": (b"BM", "BMP"), ".gif": (b"GIF8", "GIF"),
               ".jpeg": (b"\xff\xd8\xff", "JPEG"), ".jpg": (b"\xff\xd8\xff", "JPEG"),
               ".png": (b"\x89PNG\r\n\x1a\n", "PNG")}

# Files checked at once: on a remote file system (gs://) each check is a round trip.
CHECK_THREADS = 16


class UnknownSplitError(DatasetError):
  """A split name the data set does not have; the message lists the ones it has."""


def even_range(total: int, index: int, count: int, drop_remainder: bool):
  """(start, size) of part `index` of `count`, exactly as `tfds.even_splits` cuts a split."""
  per, extra = divmod(total, count)
  if drop_remainder:
    return per * index, per
  return per * index + min(index, extra), per + (index < extra)


def open_source(dc):
  """The source a data config names, prepared for reading (or a DatasetError saying why not)."""
  name = getattr(dc, "name", None)
  if name not in DATASETS:
    raise DatasetError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
  data_dir = getattr(dc, "data_dir", None) or None
  if name == "imagefolder":
    return ImageFolderSource(data_dir)
  if name == "digits":
    builder = SklearnDigits(data_dir=data_dir)
    if not builder.is_prepared():
      # Nothing to download (the data ships with scikit-learn); skip TFDS's GCS lookup, which
      # would need the network.
      prepare_once(builder, download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  else:
    builder = tfds.builder(name, data_dir=data_dir)
    _prepare(builder, name, bool(getattr(dc, "download", False)))
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
    raise DatasetError(f"dataset {name!r} is not prepared in data dir {root!r} and dataset.download "
                       f"is False. {how}, or pass --config.dataset.download=True to download it here.")
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
    """This process's part of `split`; `seed` shuffles the files, None keeps the stored order."""
    if self._known:
      part = tfds.even_splits(split, n=count, drop_remainder=drop_remainder)[index]
      ds = self._dataset(part, seed)
    else:
      start, size = even_range(self.split_size(split), index, count, drop_remainder)
      ds = self._dataset(split, seed).skip(start).take(size)
    return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

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
        read_config=tfds.ReadConfig(shuffle_seed=seed))


class ImageFolderSource:
  """root/<split>/<class>/<image>: classes are the sorted class-folder names of all splits.

  Not `tfds.ImageFolder`: that one shuffles files without a seed, has no sub-splits, and
  decodes to a fixed channel count; here refs are file paths, read after any resume skip.
  A split's files are checked (readable, image header) when it is first listed.
  """

  def __init__(self, root: Optional[str]):
    if not root:
      raise DatasetError("dataset 'imagefolder' needs dc.data_dir: a folder holding one "
                         "sub-folder per split, each with one sub-folder per class")
    if not tf.io.gfile.isdir(root):
      raise DatasetError(f"image folder root {root!r} does not exist (expected "
                         f"{os.path.join(root, '<split>', '<class>', '<image>')})")
    self.name = "imagefolder"
    self._root = root
    self.splits = _subfolders(root)
    self.classes = sorted({c for s in self.splits for c in _subfolders(os.path.join(root, s))})
    self.num_classes = len(self.classes)
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
      # whatever the pipeline's shuffle buffer.
      ds = ds.shuffle(max(size, 1), seed=seed, reshuffle_each_iteration=True)
    return ds

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
