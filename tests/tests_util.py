"""Helpers shared by the end-to-end tests."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name, arg, **overrides):
  """configs/<name>.py's get_config(arg), with dotted-field overrides."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
