"""The training loop: TFDS batches -> sharded jit steps -> clu metrics, results.json, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job for one model; re-running it on the same
workdir resumes from the latest checkpoint with the same data order, so an interrupted run ends
where an uninterrupted one would.
"""

import dataclasses
import math
import os
import time

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions

from featdiv_jax import checkpoint, configlib, console as console_lib, data, evaluation, guards
from featdiv_jax import metrics, models, runs
from featdiv_jax import sharding, steps
from featdiv_jax.evaluation import evaluate_split
from featdiv_jax import workdir as workdir_lib
from featdiv_jax.progress import Progress


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved. Re-run to resume.
  `exit_code`: 0 for a preemption notice (the scheduler restarts the job), 130 for a Ctrl-C."""

  def __init__(self, message: str, exit_code: int = 0):
    super().__init__(message)
    self.exit_code = exit_code


class NonFiniteError(ValueError):
  """The training loss became NaN or inf."""


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Durations in steps: the loop only sees steps."""
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  checkpoint_every: int
  log_every: int

  @classmethod
  def of(cls, config, train_size: int) -> "Schedule":
    per_epoch = max(1, train_size // config.batch_size)
    total = config.total_steps or max(1, math.ceil(config.num_epochs * per_epoch))
    def every(steps: int, epochs: float) -> int:
      return steps or max(1, round(epochs * per_epoch))
    return cls(steps_per_epoch=per_epoch, total_steps=total,
               eval_every=every(config.eval_every_steps, config.eval_every_epochs),
               checkpoint_every=every(config.checkpoint_every_steps,
                                      config.checkpoint_every_epochs),
               log_every=config.log_every_steps)

  def due(self, step: int, every: int) -> bool:
    """Every `every` steps, and always at the last one."""
    return step % every == 0 or step == self.total_steps


def train_and_evaluate(config, workdir: str) -> dict:
  """Validates `config`, then trains and evaluates it in `workdir`; returns results.json."""
  config = configlib.with_protocol(config)
  configlib.validate(config, jax.device_count(), jax.process_count())
  return train_validated(config, workdir)


def train_runs(runs: list, workdir: str, console: console_lib.Console | None = None) -> dict:
  """Each (sub-workdir, validated config) of `configlib.validated_runs`: {variant: results}.
  `console` shows their progress (which of how many, and the ETA of all)."""
  if console is not None:
    console.plan([Schedule.of(config, data.dataset_info(config.dataset).train_size).total_steps
                  for _, config in runs])
  return {config.variant: train_validated(config, os.path.join(workdir, sub), console=console)
          for sub, config in runs}


def train_validated(config, workdir: str, **run_options) -> dict:
  """Trains a config that `configlib.validate` accepted; the workdir is checked and locked
  before anything is written. `run_options`: TrainingRun's keyword arguments (the end-to-end
  benchmark shares one trainer between runs and turns checkpoints off)."""
  workdir = os.path.abspath(workdir)
  info = data.dataset_info(config.dataset)
  workdir_lib.check(workdir, config)
  with guards.WorkdirLock(workdir), guards.PreemptionWatch() as preemption:
    log = console_lib.open_log()  # the command's log file, from its first accepted run on
    if log and run_options.get("console"):
      run_options["console"].message(f"featdiv_jax: the full log is in {log}")
    if jax.process_index() == 0:
      workdir_lib.record_config(workdir, config)
    return TrainingRun(config, workdir, info, **run_options).train(preemption)


def results_json(config, progress: Progress, schedule: Schedule, num_params: int) -> dict:
  """What results.json holds."""
  accs = [h["eval_accuracy"] for h in progress.history]
  best = progress.best
  return dict(
      config=config.to_dict(), variant=config.variant, history=progress.history,
      best_eval_accuracy=max(accs) if accs else None,
      best_step=best["step"] if best else None,
      initialised_from=progress.initialised_from,
      final_eval_accuracy=accs[-1] if accs else None,
      eval_head_cosine_matrix=progress.eval_head_cosine_matrix,
      eval_head_cka_matrix=progress.eval_head_cka_matrix,
      num_params=num_params, wall_time_s=progress.wall_time_s,
      train_images_per_s=progress.train_images_per_s, skipped_steps=progress.skipped_steps,
      step=progress.step, total_steps=schedule.total_steps,
      steps_per_epoch=schedule.steps_per_epoch, finished=progress.step >= schedule.total_steps)


class TrainingRun:
  """One model's training in one workdir: its compiled steps, checkpoints and progress.

  `trainer`: one `make_trainer` built for this config (and `train_size`) before, whose compiled
  steps are reused; `checkpoints=False` neither restores nor saves (the benchmark's runs);
  `console`: where a person watches the run (none: nothing is printed, only logged).
  """

  def __init__(self, config, workdir: str, info: data.DatasetInfo, *,
               trainer: steps.Trainer | None = None, checkpoints: bool = True,
               console: console_lib.Console | None = None):
    self.config, self.workdir = config, workdir
    self.console = console or console_lib.Console(enabled=False)
    self.schedule = Schedule.of(config, info.train_size)
    self.trainer = trainer or make_trainer(config, info, self.schedule)
    self.checkpoints = checkpoints
    self.ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                        keep=config.keep_checkpoints, keep_best=config.keep_best)
    self.is_main = jax.process_index() == 0
    self.carry = None  # metrics.LoopCarry on the device, while the loop runs
    self.step_now = 0  # the step the loop is at (dispatched; the device may be behind it)

  def train(self, preemption: guards.PreemptionWatch) -> dict:
    """Runs (or resumes) the loop to the last step; returns results.json."""
    state, progress = self.restore_or_init()
    self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    if self.is_main and self.checkpoints:
      self.rebuild_damaged_results(progress)
    self.writer = metric_writers.create_default_writer(self.workdir,
                                                       just_logging=not self.is_main)
    if not progress.step:
      logging.info("Parameters:\n%s", parameter_table(state.params))
      self.writer.write_hparams(_flat(self.config.to_dict()))
    self.report = periodic_actions.ReportProgress(
        num_train_steps=self.schedule.total_steps, writer=self.writer)
    self.console.start_run(self.config.variant, self.schedule.total_steps, progress.step)
    try:
      state = self.loop(state, progress, preemption)
    except Exception as e:  # pylint: disable=broad-except  # an OOM is rewritten, others pass
      asked = guards.out_of_memory(e)
      if asked is None:
        raise
      logging.info("Out of memory", exc_info=True)  # XLA's own report, in the log
      raise guards.OutOfMemoryError(self.out_of_memory_message(asked)) from None
    finally:  # let an in-flight async save finish, even on an exception or a signal
      self.console.end_run()
      self.ckpts.wait()
      self.ckpts.close()
      self.writer.flush()
    self.save_results(progress)
    return self.results(progress)

  def loop(self, state, progress: Progress, preemption):
    """Each step: train, then log, evaluate, checkpoint or stop for a preemption when due.

    A step is one asynchronous dispatch: batches arrive on the device ahead of their step
    (`sharding.prefetch`) as uint8, and the train averages and the NaN guard accumulate inside
    the compiled step (`metrics.LoopCarry`); the host reads them only at log, eval and
    checkpoint steps."""
    config, schedule, first = self.config, self.schedule, progress.step + 1
    batches = sharding.prefetch(
        data.train_batches(config.dataset, global_batch_size=config.batch_size,
                           seed=config.seed, start_step=progress.step),
        self.trainer.batch_sharding)
    eval_batch = config.eval_batch_size or config.batch_size
    _, self.make_eval_iter = data.eval_batches(config.dataset, global_batch_size=eval_batch)
    probe_examples = configlib.probe_examples(config)
    self.make_probe_iter = probe_examples and data.eval_batches(
        config.dataset, global_batch_size=eval_batch, side="train",
        max_examples=probe_examples)[1]
    self.carry = self.trainer.make_carry(progress.since_eval)
    self.skipped_before = progress.skipped_steps
    progress.start_clock()
    preemption.start(progress.step)
    if first > schedule.total_steps:
      logging.info("%s already finished at step %d", self.workdir, progress.step)
    guards.fault_point("compile", progress.step)
    for step in range(first, schedule.total_steps + 1):
      self.step_now = step
      state, self.carry = self.trainer.loop_step(state, next(batches), self.carry)
      guards.fault_point("step", step)
      self.report(step)
      self.console.step(step)
      self.time_step(state, progress.watch, is_first=step == first)
      if schedule.due(step, schedule.log_every):
        self.log_train(step, progress)
      evaluated = schedule.due(step, schedule.eval_every)
      if evaluated:
        self.evaluate(step, state, progress)
      new_best = evaluated and config.keep_best and progress.best["step"] == step
      # Asked every step: with several processes JAX's preemption sync point must be reached
      # at each one.
      if preemption.should_stop(step):
        self.stop_for_preemption(step, state, progress, preemption.signal_name)
      elif self.checkpoints and (schedule.due(step, schedule.checkpoint_every) or new_best):
        self.save(step, state, progress, best=progress.best["eval_accuracy"] if new_best else None)
    return state

  def time_step(self, state, watch, is_first: bool) -> None:
    """The first step compiles: the stopwatch starts once it is done and counts what follows."""
    if is_first:
      jax.block_until_ready(state.step)
      watch.start()
    else:
      watch.images += self.config.batch_size

  def log_train(self, step: int, progress: Progress) -> None:
    self.check_finite(progress)
    since_log = jax.device_get(self.carry.since_log)
    self.carry = self.carry.replace(since_log=self.trainer.make_carry().since_log)
    summary = {f"train_{k}": float(v) for k, v in since_log.compute().items()}
    progress.watch.lap()
    if progress.watch.rate():
      summary["train_images_per_s"] = progress.watch.rate()
    self.writer.write_scalars(step, summary)
    self.console.train_metrics(summary["train_loss"], progress.watch.rate())

  def evaluate(self, step: int, state, progress: Progress) -> None:
    """Evaluates, adds the entry to the history and writes results.json."""
    jax.block_until_ready(state.step)
    progress.watch.stop()
    start = time.perf_counter()
    with self.report.timed("eval"):
      result = evaluate_split(self.trainer.eval_step, state, self.make_eval_iter,
                              self.trainer.batch_sharding, step,
                              self.make_probe_iter if self.probe_due(step, progress) else None)
      if state.ema is not None:  # the EMA model: its accuracy and loss only
        ema = evaluate_split(self.trainer.eval_step, steps.ema_view(state), self.make_eval_iter,
                             self.trainer.batch_sharding, step, None)
        result.update(eval_ema_accuracy=ema["eval_accuracy"], eval_ema_loss=ema["eval_loss"])
    self.catch_up(step, progress)
    train_summary = jax.device_get(progress.since_eval).compute()
    entry = dict(step=step, epoch=step / self.schedule.steps_per_epoch,
                 train_loss=float(train_summary["loss"]),
                 train_accuracy=float(train_summary["accuracy"]),
                 train_head_cosine=float(train_summary["head_cosine"]),
                 **{k: v for k, v in result.items() if k not in evaluation.MATRICES},
                 eval_time_s=time.perf_counter() - start)
    progress.add_evaluation(entry, result["eval_head_cosine_matrix"],
                            result["eval_head_cka_matrix"])
    self.carry = self.carry.replace(since_eval=self.trainer.make_carry().since_eval)
    self.writer.write_scalars(step, {k: v for k, v in evaluation.scalars(entry).items()
                                     if k.startswith("eval_")})
    heads = evaluation.console_line(entry)
    line = (f"step {step}/{self.schedule.total_steps}: eval accuracy "
            f"{entry['eval_accuracy']:.4f}, loss {entry['eval_loss']:.4f}"
            + (f" (EMA {entry['eval_ema_accuracy']:.4f}, loss {entry['eval_ema_loss']:.4f})"
               if "eval_ema_accuracy" in entry else "")
            + (f"; {heads}" if heads else ""))
    logging.info("%s", line)
    self.console.evaluation(line)
    self.save_results(progress)
    progress.watch.start()

  def probe_due(self, step: int, progress: Progress) -> bool:
    """The linear probes run at the last evaluation, and every analysis.probe_every_evals-th."""
    if not self.make_probe_iter:
      return False
    every = configlib.analysis_field(self.config, "probe_every_evals")
    return step == self.schedule.total_steps or bool(
        every and (len(progress.history) + 1) % every == 0)

  def save(self, step: int, state, progress: Progress, best: float | None = None) -> None:
    """Starts an asynchronous checkpoint of `state` and `progress` at `step` (`best`: the new
    best eval accuracy it is kept for, with keep_best)."""
    jax.block_until_ready(state.step)
    progress.watch.stop()
    self.catch_up(step, progress)
    with self.report.timed("checkpoint"):
      self.ckpts.save(step, state, progress.to_json(), best=best)
    progress.watch.start()

  def stop_for_preemption(self, step: int, state, progress: Progress,
                          signal_name: str = "SIGTERM") -> None:
    self.save(step, state, progress)
    self.ckpts.wait()
    self.save_results(progress)
    what, code = ("interrupted", 130) if signal_name == "SIGINT" else ("preempted (SIGTERM)", 0)
    raise Preempted(f"{what} at step {step} of {self.schedule.total_steps}: checkpoint saved "
                    f"in {self.workdir}; re-run the same command to resume", code)

  def catch_up(self, step: int, progress: Progress) -> None:
    """Brings `progress` up to `step` after checking every step since the last check."""
    self.check_finite(progress)
    progress.since_eval = self.carry.since_eval
    progress.advance(step)

  def restore_or_init(self) -> tuple:
    """(state, progress) of the latest checkpoint that restores, or a fresh start."""
    restored = self.checkpoints and self.ckpts.restore_latest(checkpoint.abstract_with_shardings(
        self.trainer.abstract_state, self.trainer.state_shardings))
    if restored:
      step, state, saved = restored
      logging.info("Resuming %s from step %d", self.workdir, step)
      return state, Progress.from_json(saved)
    state, source = initial_state(self.config, self.trainer)
    return state, Progress(initialised_from=source)

  def results(self, progress: Progress) -> dict:
    return results_json(self.config, progress, self.schedule, self.num_params)

  def out_of_memory_message(self, asked: str) -> str:
    """One line for an out-of-memory error near `self.step_now`: what was asked for, the fields
    that set the memory a step needs, and what to change."""
    c = self.config
    first = self.step_now <= 1 or not self.step_now
    when = "compiling or running the first step" if first else f"at step {self.step_now}"
    evals = f", eval_batch_size={c.eval_batch_size}" if c.eval_batch_size else ""
    return (f"out of memory {when} on {jax.device_count()} {jax.default_backend()} device(s) "
            f"({asked}): batch_size={c.batch_size}{evals}, model.dtype={c.model.dtype}, "
            f"{c.model.num_heads} x {c.model.arch} at {c.dataset.image_size} px do not fit; "
            f"lower batch_size (e.g. --config.batch_size={max(1, c.batch_size // 2)}), or use "
            "--config.model.dtype=bfloat16, or more devices")

  def rebuild_damaged_results(self, progress: Progress) -> None:
    """An unreadable results.json (truncated, not JSON) is set aside as results.json.damaged and
    written again from the checkpoint's own record (its history and timings), with a warning."""
    aside = workdir_lib.set_aside_damaged_results(self.workdir)
    if aside:
      logging.warning("%s was damaged: kept as %s and rebuilt from %s", os.path.join(
          self.workdir, workdir_lib.RESULTS_FILE), aside,
          f"the checkpoint of step {progress.step}" if progress.step else "a fresh start")
      self.save_results(progress)

  def save_results(self, progress: Progress) -> None:
    """Replaces results.json (process 0); a full disk is one guards.DiskFullError naming it."""
    if not self.is_main:
      return
    path = os.path.join(self.workdir, workdir_lib.RESULTS_FILE)
    try:
      guards.fault_point("results", progress.step, path)
      workdir_lib.write_results(self.workdir, self.results(progress))
    except OSError as e:
      if guards.disk_full(e) is None:
        raise
      raise guards.DiskFullError(
          f"no space left on device writing {path} at step {progress.step} (the file is "
          f"unchanged); {self.ckpts.after_disk_full()}") from e

  def check_finite(self, progress: Progress) -> None:
    """Raises NonFiniteError naming the first step whose loss is NaN/inf (nothing is saved
    after it: the last checkpoint stays the last good one); counts skipped steps."""
    progress.skipped_steps = self.skipped_before + int(jax.device_get(self.carry.skipped))
    bad = metrics.first_bad(self.carry)
    if bad:
      step, name, value = bad
      raise NonFiniteError(
          f"train {name} is {value} at step {step}; stopped. The last "
          f"checkpoint (step {self.ckpts.latest_step()}) is kept as it was. Lower "
          "optimizer.learning_rate, or set skip_nonfinite=True to skip such updates and count "
          "them")


def make_trainer(config, info: data.DatasetInfo, schedule: Schedule | None = None
                 ) -> steps.Trainer:
  """The loop's trainer for `config` on its mesh."""
  schedule = schedule or Schedule.of(config, info.train_size)
  return steps.make_trainer(
      config, info.num_classes, sharding.make_mesh(config.mesh),
      total_steps=schedule.total_steps, steps_per_epoch=schedule.steps_per_epoch,
      accumulate_fn=metrics.accumulate, carry_fn=metrics.empty_carry)


def loop_step(trainer: steps.Trainer):
  """`(state, device batch, carry or None) -> (state, carry)`: the compiled call the loop makes
  each step (None: a fresh carry)."""
  def step(state, batch, carry):
    return trainer.loop_step(state, batch, trainer.make_carry() if carry is None else carry)
  return step


def initial_state(config, trainer: steps.Trainer) -> tuple:
  """(a fresh state from `config.seed` with `model.init_from` loaded into `model.init_heads`,
  where those heads came from: {"path", "step", "head"} or None)."""
  state = trainer.init_state(jax.random.key(config.seed))
  model_config = config.model
  if not model_config.init_from:
    return state, None
  head, source = load_head(model_config)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for k in model_config.init_heads:
    variables = models.place_head(variables, head, k)
  logging.info("Loaded %s into heads %s", source, tuple(model_config.init_heads))
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                        ema=None if state.ema is None else steps.ema_start(variables))
  return jax.device_put(state, trainer.state_shardings), source


def load_head(model_config) -> tuple:
  """(head variables, source record) of `model.init_from`: a featdiv run's head
  `init_from_head` at its latest/best/N step, or a timm weights file."""
  spec = model_config.init_from
  run_spec = runs.split_spec(spec)
  if run_spec is None:
    head = models.load_timm_weights(spec, model_config.arch, stem=model_config.stem)
    return head, dict(path=os.path.abspath(spec), step=None, head=None)
  run = runs.load(*run_spec)
  head = runs.head_variables(run, model_config.init_from_head)
  return head, dict(path=run.workdir, step=run.step, head=model_config.init_from_head)


def parameter_table(params) -> str:
  """clu's parameter overview; with the mean and std of each array only where this process holds
  all of it (head-sharded parameters on several hosts are not fully addressable)."""
  with_stats = all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params))
  return parameter_overview.get_parameter_overview(params, include_stats=with_stats)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
