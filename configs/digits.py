"""The embedded default: scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 32x32.

Needs no download (the data ships with scikit-learn) and by default runs the whole comparison
-- single SE-ResNet-18, two heads, two heads + cosine penalty -- in about five minutes on 2 CPU
cores. timm's ImageNet stem takes the 32x32 input to an 8x8 map, the digits' own resolution.

  python -m featdiv_jax.main --config=configs/digits.py --workdir=runs/digits
  python -m featdiv_jax.main --config=configs/digits.py:multi_cos,seed=1 --workdir=runs/d1
"""

from featdiv_jax import configlib


def get_config(arg=None):
  c = configlib.default_config()
  c.variant = configlib.COMPARE
  c.dataset.name = "digits"
  c.dataset.train_split, c.dataset.eval_split = "train", "test"
  c.dataset.resize_size, c.dataset.image_size = 32, 32
  c.dataset.pad = 2                     # small shifts; no flips for digits
  c.dataset.mean, c.dataset.std = (0.5,) * 3, (0.5,) * 3
  c.model.stem = "imagenet"  # timm's stem, as the paper used at 32x32; the digits are 8x8 anyway
  c.model.arch = "seresnet18"
  c.num_epochs = 10.0
  c.batch_size = 64
  c.optimizer.learning_rate = 1e-3
  c.log_every_steps = 20
  return configlib.apply_arg(c, arg)
