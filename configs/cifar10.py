"""CIFAR-10 at 32x32 with the CIFAR stem (3x3/1 conv, no max-pool).

The paper used timm's ImageNet stem, which shrinks a 32x32 image to a 1x1 map (docs/reference.md);
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
  return configlib.apply_arg(c, arg, words={configlib.PAPER: paper})


def paper(c):
  """The notebook's recipe: timm's ImageNet stem at 32x32 (a 1x1 final map), Resize(32) and
  flips without a crop, the notebook's std, batch 128, hidden 256; stage 2 runs 30 epochs on a
  200-epoch cosine horizon after a 30-epoch stage 1."""
  configlib.paper_recipe(c, hidden=256, batch_size=128, num_epochs=30, decay_epochs=200,
                         stage1_epochs=30)
  c.model.stem = "imagenet"
  c.dataset.pad, c.dataset.train_crop = 0, "center"  # 32 of 32: no crop
  c.dataset.std = (0.2023, 0.1994, 0.2010)
