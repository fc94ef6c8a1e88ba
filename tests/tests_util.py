"""Helpers shared by the end-to-end tests."""

import os
import pathlib

import jax
import numpy as np

from featdiv_jax import checkpoint, configlib, progress, sharding, steps
from featdiv_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name, arg, **overrides):
  """configs/<name>.py's get_config(arg), with dotted-field overrides."""
  c = configlib.load_config_file(ROOT / "configs" / f"{name}.py", arg)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def save_random_run(workdir, config, steps_saved, seed=0):
  """A run's workdir as the training loop leaves it -- config.json and checkpoints at
  `steps_saved` of the train state its Trainer builds, saved the loop's way -- with random
  values in place of trained ones (BatchNorm statistics and gammas too): what the tools that
  read a run see is the same, and no train step has to compile. Returns the last state."""
  trainer = steps.make_trainer(config, 10, sharding.make_mesh(config.mesh),
                               total_steps=max(steps_saved))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if getattr(path[-1], "key", None) == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    return (0.2 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

  workdir_lib.record_config(workdir, config)
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"))
  for step in steps_saved:
    state = jax.tree.map_with_path(fill, trainer.abstract_state)
    state = state.replace(step=np.asarray(step, np.int32))
    ckpts.save(step, state, progress.Progress().to_json())
  ckpts.wait()
  ckpts.close()
  return state
