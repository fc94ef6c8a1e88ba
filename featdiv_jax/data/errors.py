"""The one exception every user mistake in the data package turns into."""

DATASETS = ("digits", "cifar10", "caltech101", "oxford_flowers102", "imagefolder")


class DatasetError(ValueError):
  """A data configuration or data directory problem, with what would be valid."""
