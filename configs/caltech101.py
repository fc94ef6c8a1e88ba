"""Caltech-101: resize 256, random 224 crop + flip, mean/std 0.5, TFDS train / test splits.

Prepare once with network: `tfds build caltech101 --data_dir=DIR`.

  python -m featdiv_jax.main --config=configs/caltech101.py:multi_cos --workdir=runs/caltech_mc
  python -m featdiv_jax.main --config=configs/caltech101.py:multi,arch=seresnet34 --workdir=runs/c101_m34
"""

from featdiv_jax import configlib


def get_config(arg=None):
  c = configlib.default_config()
  c.dataset.name = "caltech101"
  c.dataset.train_split, c.dataset.eval_split = "train", "test"
  c.dataset.resize_size, c.dataset.image_size = 256, 224
  c.dataset.flip = True
  return configlib.apply_arg(c, arg)
