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
  # A small train split: an epoch is a few seconds on a GPU, its checkpoint ~0.6 GB (two
  # seresnet18 heads with AdamW moments), so checkpoints come every 5 epochs; eval stays
  # per epoch (the paper reports the best epoch) and reads its decoded split from memory.
  c.checkpoint_every_epochs = 5.0
  return configlib.apply_arg(c, arg, words={configlib.PAPER: paper})


def paper(c):
  """The notebook's recipe: train on `train`, evaluate on `validation`, Resize 256 + CenterCrop
  224 + flips, batch 32; stage 2 runs 30 epochs on a 200-epoch cosine horizon after a 30-epoch
  stage 1."""
  configlib.paper_recipe(c, hidden=512, batch_size=32, num_epochs=30, decay_epochs=200,
                         stage1_epochs=30)
  c.dataset.train_crop = "center"
