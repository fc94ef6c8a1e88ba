"""CIFAR-10 at 32x32 with the CIFAR stem (3x3/1 conv, no max-pool).

The paper used timm's ImageNet stem, which shrinks a 32x32 image to a 1x1 map (REFERENCE.md);
pass `stem=imagenet` to reproduce that. Prepare once with network: `tfds build cifar10`.

  python -m featdiv_jax.main --config=configs/cifar10.py:multi_cos --workdir=runs/cifar10_mc
  python -m featdiv_jax.main --config=configs/cifar10.py:single,arch=seresnet34 --workdir=runs/c10_s34
"""

from featdiv_jax import configlib


def get_config(arg=None):
  c = configlib.default_config()
  c.dataset.name = "cifar10"
  c.dataset.train_split, c.dataset.eval_split = "train", "test"
  c.dataset.image_size, c.dataset.resize_size = 32, 0
  c.dataset.pad, c.dataset.flip = 4, True       # pad-4 random crop + flip
  c.dataset.mean = (0.4914, 0.4822, 0.4465)
  c.dataset.std = (0.2470, 0.2435, 0.2616)
  c.model.stem = "cifar"
  return configlib.apply_arg(c, arg)
