"""The one exception every user mistake in the data package turns into, and the data options
that configlib validates."""

DATASETS = ("digits", "cifar10", "caltech101", "oxford_flowers102", "imagefolder")
TRAIN_CROPS = ("random", "center")  # dataset.train_crop: after resize (and pad)


class DatasetError(ValueError):
  """A data configuration or data directory problem, with what would be valid."""
