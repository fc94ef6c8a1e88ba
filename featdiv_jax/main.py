r"""Train and evaluate: `python -m featdiv_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

Re-running the same command resumes from the latest checkpoint in DIR. With the `compare`
variant (the digits default) each of `config.compare_variants` trains in DIR/<variant> and a
table of their accuracies is printed at the end. The flags are described in `featdiv_jax.cli`;
absl's own flags (e.g. `--verbosity`) are accepted too.

The terminal shows a progress bar per model, a line per evaluation and the table
(`featdiv_jax.console`); the full log goes to DIR/train.log. `--verbose` prints it all instead.
"""

import logging as std_logging
import os
import sys

INTERRUPTED_OUTSIDE_TRAINING = ("featdiv_jax: interrupted outside a training loop (before it "
                                "started or between runs); every checkpoint saved so far is kept")


def _interrupted_outside_training(signum, frame):
  """SIGINT while no training loop watches for it (imports, data preparation, model build, between
  the runs of a comparison): nothing is being saved then, so the process ends at once, in one
  line, instead of a KeyboardInterrupt traceback from inside whichever library was running."""
  del signum, frame
  # To the terminal's stderr as the process started with it: while TensorFlow is imported fd 2
  # is a temporary file that holds its start-up notices (featdiv_jax.data).
  os.write(_TERMINAL_STDERR[0], f"{INTERRUPTED_OUTSIDE_TRAINING}\n".encode())
  os._exit(130)  # pylint: disable=protected-access


_TERMINAL_STDERR = [2]  # a duplicate of the starting fd 2, made at the entry point


if __name__ == "__main__":  # `python -m featdiv_jax.main`: before any library starts a thread
  import signal
  _TERMINAL_STDERR[0] = os.dup(2)
  signal.signal(signal.SIGINT, _interrupted_outside_training)  # the loop installs its own
  from featdiv_jax import hostmem
  hostmem.at_entry_point()
  if "--verbose" not in sys.argv:  # TensorFlow's C++ INFO notices (before TF is imported)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402
from absl import flags
from absl import logging
import jax

from featdiv_jax import cli, configlib, console, data, distributed, guards, runs, sharding, train
from featdiv_jax import workdir

USER_ERRORS = (configlib.ConfigError, data.DatasetError, sharding.MeshError, runs.RunError,
               workdir.WorkdirError, guards.WorkdirBusyError, train.NonFiniteError,
               distributed.DeviceCountError, guards.OutOfMemoryError)


class _QuietLibraries(std_logging.Filter):
  """Drops orbax's and TFDS's per-save / per-read INFO chatter, and orbax's tracebacks of a full
  disk (one per writer thread; the run ends with one line that says it); other warnings pass."""

  def filter(self, record):
    if not any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/")):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    return (guards.disk_full(record.exc_info[1]) is None if record.exc_info else
            guards.disk_full(Exception(record.getMessage())) is None)


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


def main(argv) -> int:
  """Runs the job; returns 0 when done or preempted (resumable), 1 for a user error or a full
  disk, 130 when interrupted (Ctrl-C; resumable once training had started)."""
  command = None
  try:
    command = cli.parse(argv[1:])
    console.log_to_file(command.workdir, command.verbose)  # held until the first run starts
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
      handler.addFilter(_QuietLibraries())
    # jax.distributed must start before jax touches a device, so its mode is checked first.
    configlib.check_distributed(command.config)
    distributed.maybe_initialize(command.config.distributed, command.coordinator_address,
                                 command.num_processes, command.process_id)
    devices = distributed.check_devices(
        distributed.expected_devices(), jax.device_count(), jax.local_device_count(),
        jax.process_count(), jax.default_backend())
    # The config and every variant it expands to, validated before any of them runs, and before
    # anything is written into the workdir (the log file).
    planned = configlib.validated_runs(command.config, jax.device_count(),
                                       jax.process_count(), command.workdir)
    screen = console.Console(enabled=jax.process_index() == 0 and not command.verbose)
    logging.info("%s", devices)
    results = train.train_runs(planned, command.workdir, console=screen)
  except USER_ERRORS as e:
    print(f"featdiv_jax: error: {e}", file=sys.stderr)
    return 1
  except train.Preempted as e:
    print(f"featdiv_jax: {e}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:  # called in-process, a Ctrl-C outside the loop (which makes it a stop)
    print(INTERRUPTED_OUTSIDE_TRAINING, file=sys.stderr)
    return 130
  except Exception as e:  # a full disk, at whichever write it showed: one line, never a traceback
    message = guards.disk_full_message(e, command.workdir if command else ".")
    if message is None:
      raise
    logging.info("Out of space", exc_info=True)  # the details, in the run log if it can be written
    print(f"featdiv_jax: error: {message}", file=sys.stderr)
    _STATE["leave_at_once"] = True
    return 1
  finally:
    console.close_log()
  if jax.process_index() == 0:
    print(summary_table(results), flush=True)
  return 0


def parse_flags(argv) -> list:
  """app.run's flag parser: absl's own flags (logging) go to absl; ours stay for `main`."""
  ours, others = cli.split(argv)
  try:
    flags.FLAGS([argv[0], *others])
  except flags.Error as e:
    print(f"featdiv_jax: error: {e}; {cli.USAGE}", file=sys.stderr)
    sys.exit(1)
  return [argv[0], *ours]


_STATE = {"leave_at_once": False}


def _main_and_leave(argv) -> int:
  """`main`; after a full disk the process ends at once: orbax's writer threads are still
  stuck on it, and the interpreter's shutdown would print a traceback for each of their pending
  writes (dozens) after the one line that says what happened."""
  code = main(argv)
  if _STATE["leave_at_once"]:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  return code


def run_cli() -> None:
  app.run(_main_and_leave, flags_parser=parse_flags)


if __name__ == "__main__":
  run_cli()
