"""Oxford Flowers-102: trained on its 1,020-image train split, evaluated on validation (as the
paper); resize 256, random 224 crop + flip, mean/std 0.5.

Prepare once with network: `tfds build oxford_flowers102 --data_dir=DIR`.

  python -m featdiv_jax.main --config=configs/flowers102.py:multi_cos --workdir=runs/flowers_mc
  python -m featdiv_jax.main --config=configs/flowers102.py:single --config.dataset.eval_split=test --workdir=runs/fl_s
"""

from featdiv_jax import configlib


def get_config(arg=None):
  c = configlib.default_config()
  c.dataset.name = "oxford_flowers102"
  c.dataset.train_split, c.dataset.eval_split = "train", "validation"
  c.dataset.resize_size, c.dataset.image_size = 256, 224
  c.dataset.flip = True
  return configlib.apply_arg(c, arg)
