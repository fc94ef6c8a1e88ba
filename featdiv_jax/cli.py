"""The command line of `featdiv_jax.main`, parsed by the project's own code.

`--config=FILE.py[:arg]` loads a config file (`configlib.load_config_file`), each
`--config.<field>=value` overrides one field, parsed by the type the field holds (as
ml_collections' config_flags parses it), and `--workdir` plus the multi-host flags are read
alongside. No absl flag is defined or parsed here, so `parse` can run any number of times in one
process, and every mistake is a `configlib.ConfigError` naming the flag and what is valid.
"""

import argparse
import ast
import dataclasses
import sys
from typing import Callable, Optional, Sequence

from absl import flags as absl_flags
import ml_collections
from ml_collections.config_flags import tuple_parser

from featdiv_jax import configlib

USAGE = ("usage: python -m featdiv_jax.main --config=configs/digits.py[:variant,...] "
         "--workdir=DIR [--config.<field>=value ...] [--verbose] "
         "[--coordinator_address=HOST:PORT --num_processes=N --process_id=I]")

# The project's own flags besides --config.<field>.
_INT_FLAGS = ("num_processes", "process_id")
_STR_FLAGS = ("config", "workdir", "coordinator_address")
_BOOL_FLAGS = ("verbose",)  # --verbose: all the logging on the terminal, no progress bar
_CONFIG_PREFIXES = ("config.", "noconfig.")


@dataclasses.dataclass(frozen=True)
class CommandLine:
  config: ml_collections.ConfigDict
  workdir: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  verbose: bool = False


def _name_and_value(arg: str):
  """('workdir', 'DIR') for '--workdir=DIR'; ('workdir', None) for '--workdir'."""
  name, sep, value = arg.lstrip("-").partition("=")
  return name, (value if sep else None)


def is_ours(arg: str) -> bool:
  """Whether `arg` is one of this command line's flags (the rest are absl's, e.g. logging)."""
  if not arg.startswith("-"):
    return False
  name, _ = _name_and_value(arg)
  return name in _INT_FLAGS + _STR_FLAGS + _BOOL_FLAGS or name.startswith(_CONFIG_PREFIXES)


def split(argv: Sequence[str]) -> tuple:
  """(our flags, everything else) of argv[1:]; a flag's separate value stays with it."""
  ours, others = [], []
  args = list(argv[1:])
  while args:
    arg = args.pop(0)
    target = ours if is_ours(arg) else others
    target.append(arg)
    if target is ours and _takes_next(arg) and args and not args[0].startswith("--"):
      ours.append(args.pop(0))
  return ours, others


def _takes_next(arg: str) -> bool:
  name, value = _name_and_value(arg)
  return value is None and not name.startswith("noconfig.") and name not in _BOOL_FLAGS


def parse(args: Sequence[str]) -> CommandLine:
  """Our flags (argv without the program name) -> a CommandLine, or a ConfigError."""
  values, overrides = {}, []
  args = list(args)
  while args:
    arg = args.pop(0)
    if not is_ours(arg):
      raise configlib.ConfigError(f"unknown flag {arg!r}; {USAGE}")
    name, value = _name_and_value(arg)
    if value is None and _takes_next(arg) and args and not args[0].startswith("--"):
      value = args.pop(0)
    if name.startswith(_CONFIG_PREFIXES):
      overrides.append((name, value))
    elif name in _BOOL_FLAGS:
      if value is not None:
        raise configlib.ConfigError(f"--{name}={value!r}: --{name} takes no value; {USAGE}")
      values[name] = True
    else:
      values[name] = value
  if not values.get("config") or not values.get("workdir"):
    raise configlib.ConfigError(USAGE)
  config = load(values["config"])
  for name, value in overrides:
    apply_override(config, name, value)
  return CommandLine(config=config, workdir=values["workdir"],
                     coordinator_address=values.get("coordinator_address"),
                     verbose=values.get("verbose", False),
                     **{k: _int_flag(k, values[k]) for k in _INT_FLAGS if k in values})


def _int_flag(name: str, value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise configlib.ConfigError(f"--{name}={value!r} is invalid; valid: an integer") from None


def load(spec: str) -> ml_collections.ConfigDict:
  """`--config=FILE.py[:arg]`: the file's get_config(arg), or one ConfigError naming the flag."""
  path, _, arg = spec.partition(":")
  try:
    return configlib.load_config_file(path, arg or None)
  except FileNotFoundError:
    raise configlib.ConfigError(
        f"--config={spec}: no config file {path!r}; valid: a file such as "
        "configs/digits.py, optionally with ':variant,key=value,...'") from None
  except configlib.ConfigError as e:
    raise configlib.ConfigError(f"--config={spec}: {e}") from None


def apply_override(config, name: str, text: Optional[str]) -> None:
  """`--config.<field>=text` (or `--config.<flag>` / `--noconfig.<flag>` for a bool)."""
  negated = name.startswith("noconfig.")
  field = name.split(".", 1)[1]
  why = configlib.unknown_field(config, field)
  if why:
    raise configlib.ConfigError(f"--config.{field}: {why}")
  current = configlib.get_field(config, field)
  if text is None and (isinstance(current, bool) or negated):
    value = not negated
    if not isinstance(current, bool):
      raise configlib.ConfigError(
          f"--{name}: only a True/False field can be set without a value; valid: "
          f"--config.{field}=<{configlib.expected_type(config, field)}>")
  elif text is None:
    raise configlib.ConfigError(f"--config.{field} needs a value: --config.{field}=VALUE")
  else:
    try:
      value = _parse_as(current, text)
    except ValueError as e:
      raise configlib.ConfigError(
          f"--config.{field}={text!r} has the wrong type ({e}); valid: "
          f"{configlib.expected_type(config, field)}") from None
  try:
    configlib.override(config, field, value)
  except configlib.ConfigError as e:
    raise configlib.ConfigError(f"--config.{field}={text!r}: {e}") from None


def _parse_as(current, text: str):
  """`text` read as a value of `current`'s type, the way ml_collections' config_flags does."""
  if isinstance(current, bool):
    return absl_flags.BooleanParser().parse(text)
  if isinstance(current, int):
    return absl_flags.IntegerParser().parse(text)
  if isinstance(current, float):
    return absl_flags.FloatParser().parse(text)
  if isinstance(current, tuple):
    return tuple_parser.TupleParser().parse(text)
  if isinstance(current, str):
    return text
  try:  # a field of another type (None, a list): a Python literal, else the text itself
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


class UsageError(ValueError):
  """A bad command line of one of the featdiv tools (evaluate, export, visualize)."""


class ToolParser(argparse.ArgumentParser):
  """argparse for the featdiv tools: a mistake is one UsageError line, which the tool prints as
  `featdiv_jax: error: ...` with exit status 1 (as main does), not argparse's block and 2."""

  def error(self, message):
    usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
    raise UsageError(f"{message}; usage: {usage}")


def run_tool(argv: Sequence[str], parser: argparse.ArgumentParser,
             action: Callable[[argparse.Namespace], Optional[str]],
             mistakes: tuple = (UsageError,)) -> int:
  """A featdiv tool's main: parse `argv` (without the program name), run `action`, print the
  line it returns (None: nothing). A mistake of a `mistakes` type is one line
  `featdiv_jax: error: ...` on stderr and exit status 1; otherwise 0."""
  try:
    line = action(parser.parse_args(argv))
  except mistakes as e:
    print(f"featdiv_jax: error: {e}", file=sys.stderr)
    return 1
  if line is not None:
    print(line, flush=True)
  return 0
