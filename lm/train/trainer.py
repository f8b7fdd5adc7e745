"""The train/eval loop: partitioned, jitted steps over a device mesh; Orbax state.

Data flows one way: config -> data pipeline -> batches -> jitted step -> state ->
checkpoint/metrics. `train_step(state, batch) -> (state, metrics)` is pure; the loop
around it owns I/O.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import config as lm_config
from lm import models
from lm.train import checkpoint as ckpt_lib
from lm.train import flops as flops_lib
from lm.train import host_memory
from lm.train import metrics as metrics_lib
from lm.train import objectives, optim, partitioning

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


@dataclasses.dataclass
class Setup:
  """Everything derived from a resolved config, before any state exists."""
  config: Any
  mesh: jax.sharding.Mesh
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying the shardings
  batch_sharding: jax.sharding.NamedSharding
  init_state: Callable  # rng -> state (jitted, sharded)
  train_step: Callable  # (state, batch) -> (state, metrics) (jitted, donated; see 'finite')
  # (state, batches with a leading axis of K) -> (state, metrics [K]): K train steps in one
  # call (None when train.steps_per_call is 1).
  train_steps: Callable | None
  eval_step: Callable  # (params, batch) -> (loss_sum, weight_sum)


def _needs_dropout(model_config) -> bool:
  return any(model_config[k] > 0 for k in ('embed_dropout', 'attn_dropout', 'resid_dropout'))


def build(config, devices=None) -> Setup:
  """Mesh, model, optimizer, shardings and the jitted steps for a resolved config."""
  mesh = partitioning.make_mesh(config.mesh, devices)
  model = models.get_model(config.model)
  seq_len = config.model.max_len
  boxed_params = models.param_shapes(model)
  tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, nn.unbox(boxed_params))
  fused_update = optim.fused_update(config.optimizer, schedule, nn.unbox(boxed_params), mesh)

  def init_boxed(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return dict(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                rng=jax.random.PRNGKey(0))  # replaced in init_state

  with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
    boxed_state = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  state_shardings = nn.unbox(partitioning.logical_shardings(boxed_state, mesh))
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nn.unbox(boxed_state), state_shardings)
  data_sharding = partitioning.batch_sharding(mesh)
  repl = partitioning.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=state_shardings)
  def init_state(rng):
    params_rng, state_rng = jax.random.split(rng)
    with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      state = nn.unbox(init_boxed(params_rng))
    state['rng'] = state_rng
    return state

  objective = objectives.get_objective(config.train.objective)
  deterministic = not _needs_dropout(config.model)
  micro = config.train.microbatches
  z_loss = config.train.z_loss

  def loss_fn(params, batch, rng):
    s, w, aux = objective(model, params, batch, rng=rng, deterministic=deterministic,
                          z_loss=z_loss)
    return s, (w, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    params = state['params']
    with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      if micro == 1:
        (loss_sum, (weight_sum, aux)), grads = grad_fn(params, batch, rng)
      else:  # accumulate sums over microbatches: exactly the big batch's mean
        split = jax.tree.map(lambda x: x.reshape((micro, -1) + x.shape[1:]), batch)
        def body(carry, mb_and_i):
          mb, i = mb_and_i
          (s, (w, aux)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
          acc = jax.tree.map(jnp.add, carry, (s, w, aux, g))
          return acc, None
        zeros = jax.tree.map(jnp.zeros_like, params)
        aux0 = {'z_loss': jnp.zeros(())} if z_loss else {}
        init = (jnp.zeros(()), jnp.zeros(()), aux0, zeros)
        (loss_sum, weight_sum, aux, grads), _ = jax.lax.scan(body, init, (split, jnp.arange(micro)))
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    if fused_update is None:
      updates, opt_state = tx.update(grads, state['opt_state'], params)
      new_params = optax.apply_updates(params, updates)
      grad_norm = optax.tree.norm(grads)
    else:  # the same update as one op (optim.fused_update)
      new_params, opt_state, grad_norm = fused_update(params, grads, state['opt_state'])
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # After a non-finite step (metrics['finite'] False) the state is not to be used: train()
    # checks before it evaluates, saves or returns a state, and stops. Keeping the old state
    # in the graph instead (a select on every leaf) made XLA copy the optimizer state each
    # step: +3% step time on shakespeare_char.
    new_state = dict(step=state['step'] + 1, params=new_params, opt_state=opt_state,
                     rng=state['rng'])
    metrics = {'train/loss': loss, 'train/grad_norm': grad_norm,
               'train/lr': schedule(state['step']), 'finite': ok, 'tokens': weight_sum}
    metrics.update({f'train/{k}': v / denom for k, v in aux.items()})
    return new_state, metrics

  def eval_step(params, batch):
    with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      s, w, _ = objective(model, params, batch, deterministic=True)
    return s, w

  batch_shardings = {k: data_sharding for k in BATCH_KEYS}
  options = compiler_options(config, mesh)
  train_steps = None
  if config.train.steps_per_call > 1:
    # K steps as one lax.scan: the state (~200 arrays for a small GPT) is dispatched and
    # donated once per call, not per step (-5% step time on shakespeare_char, 2 CPU cores).
    stacked = partitioning.stacked_batch_sharding(mesh)
    train_steps = flops_lib.jit(lambda state, batches: jax.lax.scan(train_step, state, batches),
                                in_shardings=(state_shardings, {k: stacked for k in BATCH_KEYS}),
                                out_shardings=(state_shardings, repl), donate_argnums=0,
                                compiler_options=options)
  return Setup(
      config=config, mesh=mesh, model=model, tx=tx, schedule=schedule,
      state_shardings=state_shardings, abstract_state=abstract_state,
      batch_sharding=data_sharding, init_state=init_state,
      train_step=flops_lib.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                               out_shardings=(state_shardings, repl), donate_argnums=0,
                               compiler_options=options),
      train_steps=train_steps,
      eval_step=flops_lib.jit(eval_step,
                              in_shardings=(state_shardings['params'], batch_shardings),
                              out_shardings=repl, compiler_options=options))


def compiler_options(config, mesh) -> dict | None:
  """XLA options for the steps: train.cpu_matmuls='onednn' sends XLA:CPU's dots to oneDNN.

  XLA:CPU's default library (YNNPACK) runs each batched matmul of attention (B*N small
  products) on one thread; oneDNN spreads them over the cores: with XLA's attention, -10%
  step time on the 6x384, T=256 model (same-process A/B, 2 cores). With the C++ attention
  kernel the choice depends on the machine: on an AVX-512 Xeon with a ~295 GFLOP/s peak,
  oneDNN and YNNPACK tie on that model and YNNPACK is 11% faster on the 4x128, T=64 one
  (its [768, 128] matmuls). The option is marked experimental in XLA, so it stays opt-in
  per config. Ignored off CPU.
  """
  if config.train.cpu_matmuls not in ('ynn', 'onednn'):
    raise ValueError(f"train.cpu_matmuls must be 'ynn' or 'onednn', got "
                     f"{config.train.cpu_matmuls!r}")
  if config.train.cpu_matmuls != 'onednn' or mesh.devices.flat[0].platform != 'cpu':
    return None
  return flops_lib.ONEDNN_OPTIONS


def global_batch(setup: Setup, local: dict) -> dict:
  """Each process's rows -> one global array per key, sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(local[k]))
          for k in BATCH_KEYS}


def global_batches(setup: Setup, locals_: list[dict]) -> dict:
  """K local batches -> one global array per key, [K, batch, ...], for setup.train_steps."""
  sharding = partitioning.stacked_batch_sharding(setup.mesh)
  return {k: jax.make_array_from_process_local_data(
      sharding, np.stack([np.asarray(b[k]) for b in locals_])) for k in BATCH_KEYS}


def steps_this_call(config, step: int) -> int:
  """train.steps_per_call, or 1 where a call of that many would start unaligned or pass a
  step that logs, evaluates, saves or ends the run (those happen between calls)."""
  k = config.train.steps_per_call
  if k <= 1 or step % k:
    return 1
  periods = [config.train.log_every, config.train.eval_every, config.checkpoint.every_steps]
  bounds = [(step // p + 1) * p for p in periods if p] + [config.train.steps]
  return k if min(bounds) >= step + k else 1


def abstract_batch(setup: Setup) -> dict:
  c = setup.config
  shape = (c.train.batch_size, c.model.max_len)
  dtypes = dict(inputs=jnp.int32, targets=jnp.int32, segment_ids=jnp.int32,
                positions=jnp.int32, weights=jnp.float32)
  return {k: jax.ShapeDtypeStruct(shape, dtypes[k], sharding=setup.batch_sharding)
          for k in BATCH_KEYS}


def compile_only(config) -> dict:
  """Lowers and compiles the train step for the configured mesh; memory per device."""
  setup = build(config)
  compiled = setup.train_step.lower(setup.abstract_state, abstract_batch(setup)).compile()
  mem = compiled.memory_analysis()
  gib = lambda b: b / 2 ** 30
  fields = ['argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'alias_size_in_bytes', 'generated_code_size_in_bytes']
  report = {f: int(getattr(mem, f, 0) or 0) for f in fields}
  # Donated state aliases its output: count arguments + temporaries (+ any new outputs).
  total = (report['argument_size_in_bytes'] + report['output_size_in_bytes']
           - report['alias_size_in_bytes'] + report['temp_size_in_bytes'])
  report['total_per_device_bytes'] = int(total)
  report['total_per_device_gib'] = round(gib(total), 3)
  report['mesh'] = dict(setup.mesh.shape)
  report['num_params'] = models.count_params(setup.abstract_state['params'])
  return report


class _Preempted:
  """SIGTERM sets a flag; the loop saves at the next step and exits cleanly."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def evaluate(setup: Setup, params, config, tokenizer) -> dict:
  from lm import data as lm_data
  loss_sum, weight_sum = 0.0, 0.0
  it = lm_data.make_eval_iter(config, tokenizer, num_batches=config.train.eval_steps)
  for local in it:
    s, w = setup.eval_step(params, global_batch(setup, local))
    loss_sum += float(s)
    weight_sum += float(w)
  loss = loss_sum / max(weight_sum, 1.0)
  return {'eval/loss': loss, 'eval/perplexity': math.exp(min(loss, 50.0))}


def train(config, workdir, log: Callable[[str], None] = print, devices=None) -> dict:
  """Trains (or resumes) per config in workdir; returns the last metrics.

  devices: the devices of the mesh (default: all); a resumed run may use a different
  number (and mesh) than the run that saved it: Orbax reshards on restore.
  """
  from lm import data as lm_data
  workdir = pathlib.Path(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint)
  latest = ckpt.latest_step()

  # The tokenizer travels with the run: reuse the saved one when resuming.
  if latest is not None and (workdir / ckpt_lib.TOKENIZER_DIR).exists():
    tokenizer = ckpt_lib.read_tokenizer(workdir)
  else:
    tokenizer = lm_data.build_tokenizer(config)
  if latest is not None and not ckpt.has_train_state(latest) and (
      workdir / ckpt_lib.CONFIG_FILE).exists():
    # An imported model: its architecture and tokenizer come from the run directory.
    saved = ckpt_lib.read_config(workdir)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model = saved.model
      config.data.tokenizer, config.data.tokenizer_path = (saved.data.tokenizer,
                                                           saved.data.tokenizer_path)
  config = lm_config.resolve(config, tokenizer)
  if latest is not None and (workdir / ckpt_lib.CONFIG_FILE).exists():
    saved = ckpt_lib.read_config(workdir)
    if saved.model.to_dict() != config.model.to_dict():
      diff = {k: (saved.model[k], config.model[k]) for k in config.model
              if saved.model.get(k) != config.model[k]}
      raise ValueError(f'{workdir} holds a run whose model differs from this config '
                       f'(saved, given): {diff}. Use a new --workdir or the same model fields.')

  setup = build(config, devices)
  train_iter = lm_data.make_train_iter(config, tokenizer)
  if latest is not None and ckpt.has_train_state(latest):
    state, data_state = ckpt.restore(latest, setup.abstract_state)
    if data_state:
      train_iter.set_state(data_state)
    log(f'Resumed from step {int(state["step"])} in {workdir}.')
  else:
    state = setup.init_state(jax.random.PRNGKey(config.train.seed))
    if latest is not None:  # an imported model: fine-tune from its params
      params = ckpt.restore_params(latest, setup.abstract_state['params'])
      state['params'] = params
      state['opt_state'] = jax.jit(setup.tx.init, out_shardings=setup.state_shardings[
          'opt_state'])(params)
      state['step'] = jnp.array(0, jnp.int32)
      log(f'Initialised from the params of {workdir} (step {latest}).')
  ckpt_lib.write_run_files(workdir, config, tokenizer)

  start = int(state['step'])
  steps = config.train.steps
  num_params = models.count_params(state['params'])
  flops_per_token = flops_lib.flops_per_token(setup.model)
  peak_total, peak_how = flops_lib.mesh_peak_flops_per_sec(setup.mesh)
  writer = metrics_lib.MetricsWriter(workdir, steps, start)
  if start == 0 or not writer.path.exists():
    writer.write({'step': start, 'num_params': num_params,
                  'model_flops_per_token': flops_per_token, 'peak_flops_per_sec': peak_total,
                  'peak_flops_how': peak_how, 'config': config.to_dict()})
  tokens_per_step = config.train.batch_size * config.model.max_len

  last = {}
  pending = None  # (metrics, first step) of the previous call, read one call late: async
  t_mark, step_mark = None, start
  best_eval = None

  def check(call_metrics, first):
    """The metrics of a call's last step; raises if any of its steps was not finite."""
    m = jax.tree.map(np.atleast_1d, jax.device_get(call_metrics))  # [K] per metric
    if not m['finite'].all():
      i = int(np.argmin(m['finite']))
      ckpt.wait()
      raise FloatingPointError(
          f'Non-finite loss at step {first + i + 1} (loss={float(m["train/loss"][i])}, '
          f'grad_norm={float(m["train/grad_norm"][i])}). Stopped; the last good checkpoint in '
          f'{ckpt.directory} is intact. Lower optimizer.lr, raise warmup, or enable grad_clip.')
    return jax.tree.map(lambda v: v[-1], m)

  def settle():
    """Checks the step still in flight: before its state is evaluated, saved or returned."""
    nonlocal pending
    if pending is not None:
      check(*pending)
      pending = None

  with _Preempted() as preempted:
    done = start
    while done < steps:
      step, k = done, steps_this_call(config, done)
      if k > 1:
        batches = global_batches(setup, [next(train_iter) for _ in range(k)])
        state, metrics = setup.train_steps(state, batches)
      else:
        state, metrics = setup.train_step(state, global_batch(setup, next(train_iter)))
      if pending is not None:
        check(*pending)
      pending = (metrics, step)
      done = step + k
      if t_mark is None:  # exclude compilation from throughput
        jax.block_until_ready(metrics)
        t_mark, step_mark = time.perf_counter(), done
      if done % config.train.log_every == 0 or done == steps:
        m = check(*pending)
        pending = None
        now = time.perf_counter()
        tps = tokens_per_step * (done - step_mark) / (now - t_mark) if done > step_mark else 0.0
        t_mark, step_mark = now, done
        last = {'step': done, 'train/loss': float(m['train/loss']),
                'train/lr': float(m['train/lr']), 'train/grad_norm': float(m['train/grad_norm']),
                'train/tokens_per_sec': tps,
                'train/mfu': tps * flops_per_token / peak_total if tps else 0.0}
        last.update({k: float(v) for k, v in m.items() if k.startswith('train/') and k not in last})
        writer.write(last)
        writer.progress(done, last['train/loss'], tps)
      eval_loss = None
      if config.train.eval_every and (done % config.train.eval_every == 0 or done == steps):
        settle()  # never evaluate the state of a non-finite step
        ev = evaluate(setup, state['params'], config, tokenizer)
        eval_loss = ev['eval/loss']
        best_eval = eval_loss if best_eval is None else min(best_eval, eval_loss)
        writer.write({'step': done, **ev})
        log(f'step {done}: eval loss {ev["eval/loss"]:.4f}, perplexity '
            f'{ev["eval/perplexity"]:.2f}')
        t_mark = None  # eval time is not training throughput
      stop = preempted.flag
      saving = done % config.checkpoint.every_steps == 0 or done == steps or stop
      if saving:
        settle()
        ckpt.save(done, state, train_iter.get_state(), config, eval_loss)
      if saving or eval_loss is not None:  # their allocations fragment the kept heap
        host_memory.release_free_memory()
      if stop:
        log(f'SIGTERM: saved step {done} in {ckpt.directory}; exiting.')
        break
    settle()
  ckpt.close()
  writer.close()
  metrics_lib.plot_losses(workdir)
  return {**last, 'best_eval_loss': best_eval, 'state': state, 'config': config,
          'tokenizer': tokenizer, 'setup': setup}
