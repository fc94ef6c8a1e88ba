"""Helpers shared by the end-to-end tests."""

import pathlib

from featdiv_jax import configlib

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
