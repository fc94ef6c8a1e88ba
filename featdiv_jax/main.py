r"""Train and evaluate: `python -m featdiv_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

Re-running the same command resumes from the latest checkpoint in DIR. With the `compare`
variant (the digits default) each of `config.compare_variants` trains in DIR/<variant> and a
table of their accuracies is printed at the end.
"""

import logging as std_logging
import os
import re
import sys

if __name__ == "__main__":  # `python -m featdiv_jax.main`: before any library starts a thread
  from featdiv_jax import hostmem
  hostmem.at_entry_point()

from absl import app  # noqa: E402
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant,key=value,...'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for jax.distributed (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")



class _QuietLibraries(std_logging.Filter):
  """Drops orbax's and TFDS's per-save / per-read INFO chatter; warnings still pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))


def maybe_initialize_distributed(mode: str) -> bool:
  """Starts JAX's distributed runtime when asked to or when a cluster environment is detected."""
  import jax
  explicit = FLAGS.coordinator_address is not None
  if mode == "off" and not explicit:
    return False
  if mode == "auto" and not explicit:
    multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (multi_slurm or tpu_pod or "JAX_COORDINATOR_ADDRESS" in os.environ
            or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ):
      return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def variants(config) -> list:
  """The configs a run trains: the config itself, or one per variant of a comparison."""
  from featdiv_jax import configlib
  if config.variant != configlib.COMPARE:
    return [config]
  return [configlib.with_variant(config, v) for v in config.compare_variants]


def run(config, workdir: str) -> dict:
  """One model, or every variant of a comparison (one sub-workdir each): {variant: results}."""
  from featdiv_jax import configlib, train
  if config.variant != configlib.COMPARE:
    return {config.variant: train.train_and_evaluate(config, workdir)}
  return {c.variant: train.train_and_evaluate(c, os.path.join(workdir, c.variant))
          for c in variants(config)}


def summary_table(results: dict) -> str:
  rows = ["variant     heads  params       best acc  final acc  head cos  img/s"]
  for variant, r in results.items():
    cos = r["history"][-1]["eval_head_cosine"] if r["history"] else None
    rows.append(f"{variant:<11} {r['config']['model']['num_heads']:>5}  {r['num_params']:>11,}  "
                f"{_pct(r['best_eval_accuracy'])}  {_pct(r['final_eval_accuracy'])}   "
                f"{'   -  ' if cos is None else f'{cos:6.3f}'}  "
                f"{r['train_images_per_s'] or 0:6.0f}")
  return "\n".join(rows)


def _pct(x):
  return "     -  " if x is None else f"{100 * x:7.2f}%"


class UsageError(Exception):
  """A bad command line: one line for the user, no traceback."""


def parse_flags(argv) -> list:
  """absl flag parsing that turns a bad flag or config into one UsageError line."""
  saved, sys.argv = sys.argv, list(argv)  # config_flags reads --config.x overrides from here
  try:
    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith("config.")]:
      delattr(FLAGS, name)  # override flags of an earlier call are defined anew
    return FLAGS(argv)
  except flags.Error as e:
    # config_flags embeds the config file's traceback; its last line is the actual error.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    message = lines[0] if len(lines) == 1 else f"{lines[0].split(':')[0]}: {lines[-1]}"
    raise UsageError(_with_valid_type(message, argv)) from None
  except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
    # config_flags resolves `--config.<field>` paths itself, and one that names no field escapes
    # as one of these instead of a flags.Error.
    raise UsageError(_unknown_override(argv) or f"{type(e).__name__}: {e}") from None
  finally:
    sys.argv = saved


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=(.*))?$", re.DOTALL)


def _overrides(argv) -> list:
  """(field, value or None) of each `--config.<field>[=value]` in argv."""
  return [m.groups() for m in map(_OVERRIDE.match, argv) if m]


def _unknown_override(argv):
  """Why the first `--config.<field>` that names no config field is wrong, or None.

  Every config file builds on `configlib.default_config()`, so its fields are the ones to know.
  """
  from featdiv_jax import configlib
  config = configlib.default_config()
  for field, _ in _overrides(argv):
    why = configlib.unknown_field(config, field)
    if why:
      return f"--config.{field}: {why}"
  return None


def _with_valid_type(message: str, argv) -> str:
  """Adds what a `--config.<field>` accepts to absl's 'flag --config.x=v: <parse error>'."""
  from featdiv_jax import configlib
  config = configlib.default_config()
  for field, value in _overrides(argv):
    if (value is not None and message.startswith(f"flag --config.{field}={value}: ")
        and not configlib.unknown_field(config, field)):
      reason = message[len(f"flag --config.{field}={value}: "):]
      return (f"--config.{field}={value!r} has the wrong type ({reason}); valid: "
              f"{configlib.expected_type(config, field)}")
  return message


def _cli_flags_parser(argv):
  try:
    return parse_flags(argv)
  except UsageError as e:
    print(f"featdiv_jax: error: {e}", file=sys.stderr)
    sys.exit(1)


def main(argv):
  """Runs the job; returns 0 when done or preempted (resumable), 1 for a user error."""
  from featdiv_jax import configlib, data, guards, sharding, train
  user_errors = (UsageError, configlib.ConfigError, data.DatasetError, sharding.MeshError,
                 train.WorkdirError, guards.WorkdirBusyError, train.NonFiniteError)
  try:
    if len(argv) > 1:  # called directly with flags (not through app.run): parse them now
      parse_flags(argv)
    if FLAGS.config is None or not FLAGS.workdir:
      raise UsageError("usage: python -m featdiv_jax.main "
                       "--config=configs/digits.py[:variant,...] --workdir=DIR")
    config = FLAGS.config
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
      handler.addFilter(_QuietLibraries())
    # jax.distributed must start before jax touches a device, so its mode is checked first.
    configlib.check_distributed(config)
    maybe_initialize_distributed(config.distributed)
    import jax
    # The config itself, then every variant it expands to, before any of them runs.
    configlib.validate(config, jax.device_count(), jax.process_count())
    if config.variant == configlib.COMPARE:
      for c in variants(config):
        configlib.validate(c, jax.device_count(), jax.process_count())
    results = run(config, FLAGS.workdir)
  except user_errors as e:
    print(f"featdiv_jax: error: {e}", file=sys.stderr)
    return 1
  except train.Preempted as e:
    print(f"featdiv_jax: {e}", file=sys.stderr)
    return 0
  if jax.process_index() == 0:
    print(summary_table(results), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_cli_flags_parser)
