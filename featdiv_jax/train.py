"""The training loop: TFDS batches -> sharded jit steps -> clu metrics, results.json, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job for one model; re-running it on the same
workdir resumes from the latest checkpoint with the same data order, so an interrupted run ends
where an uninterrupted one would.
"""

import functools
import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview

from featdiv_jax import checkpoint, configlib, data, guards, models, sharding, steps


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  cross_entropy: clu_metrics.Average.from_output("cross_entropy")
  penalty: clu_metrics.Average.from_output("penalty")
  head_cosine: clu_metrics.Average.from_output("head_cosine")
  accuracy: clu_metrics.Average.from_output("accuracy")
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


_AVERAGED = ("loss", "cross_entropy", "penalty", "head_cosine", "accuracy")


def step_metrics(m: dict) -> TrainMetrics:
  """One step's metrics; a skipped (non-finite) update does not count in the averages."""
  keep = 1.0 - m["skipped"]
  return TrainMetrics.empty().replace(
      learning_rate=clu_metrics.LastValue.from_model_output(m["learning_rate"]),
      **{k: clu_metrics.Average(total=jnp.where(keep > 0, m[k], 0.0), count=keep)
         for k in _AVERAGED})


def metrics_to_json(collection) -> dict | None:
  """The running averages of a TrainMetrics as JSON, so a checkpoint can carry them."""
  if collection is None:
    return None
  host = jax.device_get(collection)
  return {k: [float(getattr(host, k).total), float(getattr(host, k).count)] for k in _AVERAGED}


def metrics_from_json(saved: dict | None):
  if not saved:
    return None
  return TrainMetrics.empty().replace(**{
      k: clu_metrics.Average(total=jnp.asarray(t, jnp.float32), count=jnp.asarray(c, jnp.float32))
      for k, (t, c) in saved.items()})


class Stopwatch:
  """Training seconds and images, excluding the compiling first step, evals and checkpoints."""

  def __init__(self):
    self.seconds, self.images, self._since = 0.0, 0, None

  def start(self):
    self._since = time.time()

  def stop(self):
    if self._since is not None:
      self.seconds += time.time() - self._since
      self._since = None

  def lap(self):
    if self._since is not None:
      self.stop()
      self.start()

  def rate(self) -> float | None:
    return self.images / self.seconds if self.seconds > 0 and self.images else None


class WorkdirError(ValueError):
  """The workdir holds a run this config cannot continue."""


def write_json_atomic(path: str, payload: Any) -> None:
  """Write-then-rename, so a kill never leaves a truncated file behind."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check_workdir(workdir: str, config) -> None:
  """Refuses a workdir whose saved config describes a different model; writes nothing."""
  path = os.path.join(workdir, "config.json")
  ours = json.loads(json.dumps(configlib.model_signature(config)))  # tuples -> lists, as saved
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f).get("signature", {})
    saved_model, our_model = saved.get("model", {}), ours["model"]
    diffs = [f"model.{k}: workdir has {saved_model.get(k)!r}, config has {our_model.get(k)!r}"
             for k in sorted(set(saved_model) | set(our_model))
             if saved_model.get(k) != our_model.get(k)]
    diffs += [f"{k}: workdir has {saved.get(k)!r}, config has {ours[k]!r}"
              for k in ours if k != "model" and saved.get(k) != ours[k]]
    if diffs:
      raise WorkdirError(f"workdir {workdir} holds a run of a different model ("
                         + "; ".join(diffs) + "); use a new --workdir or the matching config")


def record_config(workdir: str, config) -> None:
  """Writes WORKDIR/config.json once, the signature later runs are checked against."""
  path = os.path.join(workdir, "config.json")
  if jax.process_index() == 0 and not os.path.exists(path):
    signature = json.loads(json.dumps(configlib.model_signature(config)))
    write_json_atomic(path, {"signature": signature, "config": config.to_dict()})


def schedule(config, train_size: int) -> dict:
  """Durations in steps: the loop only sees steps."""
  steps_per_epoch = max(1, train_size // int(config.batch_size))
  total = int(config.total_steps) or max(1, math.ceil(float(config.num_epochs) * steps_per_epoch))
  return dict(steps_per_epoch=steps_per_epoch, total_steps=total,
              eval_every=int(config.eval_every_steps) or steps_per_epoch,
              checkpoint_every=int(config.checkpoint_every_steps) or steps_per_epoch)


def initial_state(config, init_fn, state_sh):
  state = jax.jit(init_fn, out_shardings=state_sh)(jax.random.key(int(config.seed)))
  if not config.model.init_from:
    return state
  head = models.load_timm_weights(config.model.init_from, config.model.arch,
                                  stem=config.model.stem)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for k in config.model.init_heads:
    variables = models.place_head(variables, head, int(k))
  logging.info("Loaded %s into heads %s", config.model.init_from, tuple(config.model.init_heads))
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  return jax.device_put(state, state_sh)


def evaluate(eval_fn, state, make_iter, batch_sh, step: int = 0) -> dict:
  sums = None
  for i, local in enumerate(make_iter()):
    out = eval_fn(state, sharding.global_batch(local, batch_sh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if i == 0:
      guards.fault_point("eval", step)
  sums = jax.device_get(sums)
  count = max(float(sums["count"]), 1.0)
  matrix = np.asarray(sums["cosine_sum"]) / count
  k = matrix.shape[0]
  off_diag = float(matrix[~np.eye(k, dtype=bool)].mean()) if k > 1 else None
  return dict(eval_loss=float(sums["loss_sum"]) / count,
              eval_accuracy=float(sums["correct"]) / count,
              eval_count=int(sums["count"]), eval_head_cosine=off_diag,
              eval_head_cosine_matrix=matrix.tolist())


def _results(config, meta, sched, num_params) -> dict:
  history = meta["history"]
  accs = [h["eval_accuracy"] for h in history]
  return dict(
      config=config.to_dict(), variant=config.variant, history=history,
      best_eval_accuracy=max(accs) if accs else None,
      final_eval_accuracy=accs[-1] if accs else None,
      eval_head_cosine_matrix=meta.get("eval_head_cosine_matrix"),
      num_params=num_params, wall_time_s=meta["wall_time_s"],
      train_images_per_s=meta.get("train_images_per_s"),
      skipped_steps=meta.get("skipped_steps", 0),
      step=meta["step"], total_steps=sched["total_steps"],
      steps_per_epoch=sched["steps_per_epoch"], finished=meta["step"] >= sched["total_steps"])


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the current step was saved. Re-run to resume."""


class NonFiniteError(ValueError):
  """The training loss became NaN or inf."""


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains and evaluates one model in `workdir`; returns what results.json holds.

  Everything is validated, and the workdir checked and locked, before any work starts.
  """
  configlib.validate(config, jax.device_count(), jax.process_count())
  workdir = os.path.abspath(workdir)
  info = data.dataset_info(config.dataset)
  check_workdir(workdir, config)  # refuses before anything is written
  with guards.WorkdirLock(workdir), guards.PreemptionWatch() as preemption:
    record_config(workdir, config)
    return _Run(config, workdir, info).train(preemption)


class _Run:
  """One training run's compiled steps, state and bookkeeping."""

  def __init__(self, config, workdir, info):
    self.config, self.workdir = config, workdir
    self.sched = schedule(config, info.train_size)
    self.is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    total = self.sched["total_steps"]
    model = steps.build_model(config.model, info.num_classes)
    lr_fn = steps.learning_rate_schedule(config.optimizer, total)
    tx = steps.make_optimizer(config.optimizer, total, tuple(config.model.frozen_heads))
    self.init_fn = functools.partial(steps.init_state, model, tx,
                                     image_size=int(config.dataset.image_size))
    self.abstract = jax.eval_shape(self.init_fn, jax.random.key(0))
    self.state_sh = sharding.state_shardings(mesh, self.abstract, int(config.model.num_heads))
    self.batch_sh = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    step_fn = steps.bind_train_step(model, tx, config, learning_rate_fn=lr_fn)
    self.train_fn = jax.jit(
        lambda s, b: (lambda s2, m: (s2, step_metrics(m), m))(*step_fn(s, b)),
        in_shardings=(self.state_sh, self.batch_sh),
        out_shardings=(self.state_sh, replicated, replicated), donate_argnums=0)
    self.eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                           in_shardings=(self.state_sh, self.batch_sh), out_shardings=replicated)
    self.ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                        keep=int(config.keep_checkpoints))

  def restore_or_init(self):
    restored = self.ckpts.restore_latest(
        checkpoint.abstract_with_shardings(self.abstract, self.state_sh))
    if restored:
      step, state, meta = restored
      logging.info("Resuming %s from step %d", self.workdir, step)
      return step, state, meta
    state = initial_state(self.config, self.init_fn, self.state_sh)
    return 0, state, dict(step=0, history=[], wall_time_s=0.0, skipped_steps=0)

  def save_results(self, meta):
    if self.is_main:
      write_json_atomic(os.path.join(self.workdir, "results.json"), self.results(meta))

  def results(self, meta) -> dict:
    return _results(self.config, meta, self.sched, self.num_params)

  def train(self, preemption) -> dict:
    from clu import metric_writers, periodic_actions  # imports TensorFlow: only when training
    config, sched = self.config, self.sched
    total_steps, batch_size = sched["total_steps"], int(config.batch_size)
    start_step, state, meta = self.restore_or_init()
    self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    writer = metric_writers.create_default_writer(self.workdir, just_logging=not self.is_main)
    if not start_step:
      parameter_overview.log_parameter_overview(state.params)
      writer.write_hparams(_flat(config.to_dict()))
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    eval_batch = int(config.eval_batch_size) or batch_size
    _, make_eval_iter = data.eval_batches(config.dataset, global_batch_size=eval_batch)
    train_iter = data.train_batches(config.dataset, global_batch_size=batch_size,
                                    seed=int(config.seed), start_step=start_step)

    # The eval interval's running train averages travel in the checkpoint, so a run resumed
    # between two evals reports the same train_loss as an uninterrupted one.
    since_log, since_eval = None, metrics_from_json(meta.get("since_eval"))
    unchecked = []  # (step, raw metrics) not yet checked for NaN/inf
    watch = Stopwatch()
    clock = dict(since=time.time())

    def bookkeep(step):
      """Brings meta up to `step` after checking every step since the last check."""
      self.check_finite(unchecked, meta)
      meta["step"] = step
      meta["wall_time_s"] += time.time() - clock["since"]
      clock["since"] = time.time()
      meta["train_images_per_s"] = watch.rate() or meta.get("train_images_per_s")

    def save(step):
      jax.block_until_ready(state.step)
      watch.stop()
      bookkeep(step)
      meta["since_eval"] = metrics_to_json(since_eval)
      with report.timed("checkpoint"):
        self.ckpts.save(step, state, meta)
      watch.start()

    try:
      for step in range(start_step + 1, total_steps + 1):
        batch = sharding.global_batch(next(train_iter), self.batch_sh)
        state, metrics, raw = self.train_fn(state, batch)
        guards.fault_point("step", step)
        unchecked.append((step, raw))
        since_log = metrics if since_log is None else since_log.merge(metrics)
        since_eval = metrics if since_eval is None else since_eval.merge(metrics)
        report(step)
        if step == start_step + 1:  # the first step compiles: time the steady state after it
          jax.block_until_ready(state.step)
          watch.start()
        else:
          watch.images += batch_size

        is_last = step == total_steps
        if step % int(config.log_every_steps) == 0 or is_last:
          self.check_finite(unchecked, meta)
          summary = {f"train_{k}": float(v) for k, v in since_log.compute().items()}
          watch.lap()
          if watch.rate():
            summary["train_images_per_s"] = watch.rate()
          writer.write_scalars(step, summary)
          since_log = None
        if step % sched["eval_every"] == 0 or is_last:
          jax.block_until_ready(state.step)
          watch.stop()
          with report.timed("eval"):
            result = evaluate(self.eval_fn, state, make_eval_iter, self.batch_sh, step)
          bookkeep(step)
          train_summary = since_eval.compute()
          since_eval = None
          entry = dict(step=step, epoch=step / sched["steps_per_epoch"],
                       train_loss=float(train_summary["loss"]),
                       train_accuracy=float(train_summary["accuracy"]),
                       train_head_cosine=float(train_summary["head_cosine"]),
                       **{k: v for k, v in result.items() if k != "eval_head_cosine_matrix"})
          meta["history"].append(entry)
          meta["eval_head_cosine_matrix"] = result["eval_head_cosine_matrix"]
          writer.write_scalars(step, {k: v for k, v in entry.items()
                                      if k.startswith("eval_") and v is not None})
          logging.info("step %d/%d: eval accuracy %.4f, loss %.4f", step, total_steps,
                       entry["eval_accuracy"], entry["eval_loss"])
          self.save_results(meta)
          watch.start()
        if step % sched["checkpoint_every"] == 0 or is_last:
          save(step)
        elif preemption.should_stop(step):
          save(step)
          self.ckpts.wait()
          self.save_results(meta)
          raise Preempted(f"preempted (SIGTERM) at step {step} of {total_steps}: checkpoint "
                          f"saved in {self.workdir}; re-run the same command to resume")
    finally:  # let an in-flight async save finish, even on an exception or a signal
      self.ckpts.wait()
      self.ckpts.close()
      writer.flush()
    if start_step >= total_steps:
      logging.info("%s already finished at step %d", self.workdir, start_step)
    self.save_results(meta)
    return self.results(meta)

  def check_finite(self, unchecked: list, meta: dict) -> None:
    """Raises NonFiniteError naming the first step whose loss is NaN/inf (nothing is saved
    after it: the last checkpoint stays the last good one); counts skipped steps."""
    if not unchecked:
      return
    host = jax.device_get([raw for _, raw in unchecked])
    stepnums = [s for s, _ in unchecked]
    unchecked.clear()
    skipped = [float(h["skipped"]) > 0 for h in host]
    meta["skipped_steps"] = meta.get("skipped_steps", 0) + sum(skipped)
    stepnums = [s for s, skip in zip(stepnums, skipped) if not skip]
    host = [h for h, skip in zip(host, skipped) if not skip]  # dropped updates are not errors
    bad = guards.first_nonfinite({k: [h[k] for h in host]
                                  for k in ("loss", "cross_entropy", "penalty")})
    if bad:
      index, name, value = bad
      last = self.ckpts.latest_step()
      raise NonFiniteError(
          f"train {name} is {value} at step {stepnums[index]}; stopped. The last checkpoint "
          f"(step {last}) is kept as it was. Lower optimizer.learning_rate, or set "
          "skip_nonfinite=True to skip such updates and count them")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
