"""The one exception every user mistake in the data package turns into, and the data options
that configlib validates."""

DATASETS = ("digits", "cifar10", "caltech101", "oxford_flowers102", "imagefolder")
TRAIN_CROPS = ("random", "center", "random_resized")  # dataset.train_crop: after resize (and pad)
# dataset.cache: decoded images kept in memory when they fit (auto), always (memory), never.
CACHE_MODES = ("auto", "memory", "none")


class DatasetError(ValueError):
  """A data configuration or data directory problem, with what would be valid."""
