"""The train/eval loop: partitioned, jitted steps over a device mesh; Orbax state.

Data flows one way: config -> data pipeline -> batches -> jitted step -> state ->
checkpoint/metrics. `train_step(state, batch) -> (state, metrics)` is pure; the loop
around it owns I/O.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
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
from lm import data as lm_data
from lm.convert import hf, hf_tokenizers
from lm import models
from lm import peft as peft_lib
from lm.train import checkpoint as ckpt_lib
from lm.train import flops as flops_lib
from lm.train import host_memory
from lm.train import metrics as metrics_lib
from lm.ops import backend
from lm.train import optim, partitioning, tasks

@dataclasses.dataclass
class Setup:
  """Everything derived from a resolved config, before any state exists."""
  config: Any
  mesh: jax.sharding.Mesh
  kernels: backend.Kernels  # the run's backend choices (lm/ops/backend.py)
  model: nn.Module
  task: tasks.Task
  tx: optax.GradientTransformation
  schedule: Callable
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying the shardings
  batch_sharding: jax.sharding.NamedSharding
  init_state: Callable  # rng -> state (jitted, sharded)
  init_extra: Callable  # params -> the task's extra state (jitted, sharded)
  train_step: Callable  # (state, batch) -> (state, metrics) (jitted, donated; see 'finite')
  # (state, batches with a leading axis of K) -> (state, metrics [K]): K train steps in one
  # call (None when train.steps_per_call is 1).
  train_steps: Callable | None
  eval_step: Callable  # (params, extra, batch) -> the task's eval stats (sums)
  adapters: peft_lib.Adapters | None = None  # config.peft (None: every param trains)

  @property
  def batch_keys(self) -> tuple[str, ...]:
    return tuple(self.task.batch_spec())


def needs_dropout(runtime, peft=None) -> bool:
  lora_dropout = peft is not None and peft.method in ('lora', 'qlora') and peft.dropout > 0
  return lora_dropout or any(runtime[k] > 0 for k in runtime if k.endswith('dropout'))


def full_params(state):
  """The model's params: the trained ones, with the frozen base where there is one."""
  if 'frozen' not in state:
    return state['params']
  return peft_lib.combine(state['params'], state['frozen'])


def saved_state(state):
  """What a checkpoint keeps: the state without the frozen base (it is config.init_from's;
  an adapter run's checkpoints hold the adapters and their optimizer state alone)."""
  return {k: v for k, v in state.items() if k != 'frozen'}


def build(config, devices=None) -> Setup:
  """Mesh, kernels, model, task, optimizer, shardings and the jitted steps for a resolved
  config. devices: those of the mesh (default: all; a TPU topology's for AOT compiles)."""
  if config.get('quant') and config.quant.method != 'none':
    raise ValueError(f'config.quant.method={config.quant.method!r}: a post-training quantized '
                     'run is for inference (sample, score, evaluate, serve). Train the float '
                     'run, or fine-tune on a 4-bit base with --config.peft.method=qlora.')
  mesh = partitioning.make_mesh(config.mesh, devices)
  adapters = peft_lib.from_config(config.peft)
  kernels = backend.select(config.runtime, mesh, adapters=adapters)
  model = models.get_model(config.model, config.runtime, kernels)
  task = tasks.get_task(config)
  seq_len = config.model.max_len
  boxed_params = models.param_shapes(model)
  peft_lib.check_targets(boxed_params, adapters)
  # With adapters only they (and peft.train_also) train: the optimizer sees them alone.
  split = ((lambda p: (p, None)) if adapters is None else
           (lambda p: peft_lib.partition(p, config.peft.train_also)))
  trained_shapes = nn.unbox(split(boxed_params)[0])
  tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps, trained_shapes)
  fused_update = optim.fused_update(config.optimizer, schedule, trained_shapes, kernels)
  if config.get('prune') and config.prune.method != 'none':  # masks in the optimizer state
    from lm.compress import prune as prune_lib
    pc = config.prune.copy_and_resolve_references()
    with pc.unlocked():
      pc.end_step = pc.end_step or (3 * config.train.steps) // 4
    tx, fused_update = prune_lib.wrap(tx, pc, trained_shapes), None

  def init_boxed(rng):
    full = model.init(rng, *models.example_inputs(model, 1, seq_len))['params']
    params, frozen = split(full)
    state = dict(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                 rng=jax.random.PRNGKey(0))  # replaced in init_state
    if frozen is not None:
      state['frozen'] = frozen
    extra = task.init_extra(full)
    if extra:  # only tasks with extra state have the key (older checkpoints lack it)
      state['extra'] = extra
    return state

  with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
    boxed_state = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  state_shardings = nn.unbox(partitioning.logical_shardings(boxed_state, mesh))
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nn.unbox(boxed_state), state_shardings)
  data_sharding = partitioning.batch_sharding(mesh)
  repl = partitioning.replicated(mesh)
  has_extra = 'extra' in abstract_state

  @functools.partial(jax.jit, out_shardings=state_shardings)
  def init_state(rng):
    params_rng, state_rng = jax.random.split(rng)
    with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      state = nn.unbox(init_boxed(params_rng))
    state['rng'] = state_rng
    return state

  @functools.partial(jax.jit, out_shardings=state_shardings.get('extra'))
  def init_extra(params):  # for params that come from elsewhere (init_from)
    return task.init_extra(params) if has_extra else None

  deterministic = not needs_dropout(config.runtime, config.peft)
  micro = config.train.microbatches

  def loss_fn(params, frozen, extra, batch, rng):  # gradients for params alone
    if frozen is not None:
      params = peft_lib.combine(params, frozen)
    s, w, aux = task.loss(model, params, extra, batch, rng, deterministic)
    return s, (w, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  prepare = getattr(task, 'prepare', None)
  updates = getattr(task, 'updates_per_batch', 1)

  def train_step(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    if prepare is not None:  # e.g. RL rollouts: made once, then `updates` updates on them
      with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
        batch = prepare(model, full_params(state), state.get('extra'), batch,
                        jax.random.fold_in(rng, 2**31 - 1))
    for u in range(updates):  # one unless the task reuses its batch (PPO epochs)
      state, metrics = update_step(state, batch, jax.random.fold_in(rng, u) if u else rng)
    return dict(state, step=state['step'] + 1), metrics

  def update_step(state, batch, rng):
    params, extra = state['params'], state.get('extra')
    grad_fn_ = functools.partial(grad_fn, frozen=state.get('frozen'))
    with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      if micro == 1:
        (loss_sum, (weight_sum, aux)), grads = grad_fn_(params, extra=extra, batch=batch,
                                                        rng=rng)
      else:  # accumulate sums over microbatches: exactly the big batch's mean
        split = jax.tree.map(lambda x: x.reshape((micro, -1) + x.shape[1:]), batch)
        def body(carry, mb_and_i):
          mb, i = mb_and_i
          (s, (w, aux)), g = grad_fn_(params, extra=extra, batch=mb,
                                      rng=jax.random.fold_in(rng, i))
          return jax.tree.map(jnp.add, carry, (s, w, aux, g)), None
        first = jax.tree.map(lambda x: x[0], split)
        shapes = jax.eval_shape(lambda p: grad_fn_(p, extra=extra, batch=first, rng=rng),
                                params)
        (_, (_, aux_shapes)), _ = shapes
        init = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, aux_shapes),
                jax.tree.map(jnp.zeros_like, params))
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
    new_state = dict(state, params=new_params, opt_state=opt_state)
    metrics = {'train/loss': loss, 'train/grad_norm': grad_norm,
               'train/lr': schedule(state['step']), 'finite': ok, 'tokens': weight_sum}
    metrics.update({f'train/{k}': v / denom for k, v in aux.items()})
    return new_state, metrics

  def eval_step(params, extra, batch):
    with nn.logical_axis_rules(partitioning.LOGICAL_RULES):
      return task.eval_stats(model, params, extra, batch)

  batch_shardings = {k: data_sharding for k in task.batch_spec()}
  options = backend.compiler_options(config.runtime, kernels)
  train_steps = None
  if config.train.steps_per_call > 1:
    # K steps as one lax.scan: the state (~200 arrays for a small GPT) is dispatched and
    # donated once per call, not per step (-5% step time on shakespeare_char, 2 CPU cores).
    stacked = partitioning.stacked_batch_sharding(mesh)
    train_steps = flops_lib.jit(lambda state, batches: jax.lax.scan(train_step, state, batches),
                                in_shardings=(state_shardings, {k: stacked for k in batch_shardings}),
                                out_shardings=(state_shardings, repl), donate_argnums=0,
                                compiler_options=options)
  return Setup(
      config=config, mesh=mesh, kernels=kernels, model=model, task=task, tx=tx,
      schedule=schedule, state_shardings=state_shardings, abstract_state=abstract_state,
      batch_sharding=data_sharding, init_state=init_state, init_extra=init_extra,
      train_step=flops_lib.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                               out_shardings=(state_shardings, repl), donate_argnums=0,
                               compiler_options=options),
      train_steps=train_steps,
      eval_step=flops_lib.jit(eval_step,
                              in_shardings=(full_params(state_shardings),
                                            state_shardings.get('extra'), batch_shardings),
                              out_shardings=repl, compiler_options=options),
      adapters=adapters)


def global_batch(setup: Setup, local: dict) -> dict:
  """Each process's rows -> one global array per key, sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(local[k]))
          for k in setup.batch_keys}


def global_batches(setup: Setup, locals_: list[dict]) -> dict:
  """K local batches -> one global array per key, [K, batch, ...], for setup.train_steps."""
  sharding = partitioning.stacked_batch_sharding(setup.mesh)
  return {k: jax.make_array_from_process_local_data(
      sharding, np.stack([np.asarray(b[k]) for b in locals_])) for k in setup.batch_keys}


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
  """The task's global batch as ShapeDtypeStructs sharded over data x fsdp."""
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding)
          for k, (shape, dtype) in setup.task.batch_spec().items()}


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


def data_iter(setup: Setup, tokenizer, split: str):
  """The task's training (split='train') or evaluation iterator over the config's data."""
  num = None if split == 'train' else setup.config.train.eval_steps
  return setup.task.data_iter(tokenizer, split, num)


def evaluate(setup: Setup, state, tokenizer) -> dict:
  """The task's eval metrics over config.train.eval_steps batches (sums, then metrics)."""
  totals = {}
  for local in data_iter(setup, tokenizer, 'eval'):
    stats = setup.eval_step(full_params(state), state.get('extra'), global_batch(setup, local))
    for k, v in jax.device_get(stats).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  metrics = setup.task.eval_metrics(totals)
  if setup.config.get('eval') and setup.config.eval.tasks:
    metrics.update(evaluate_tasks(setup, full_params(state), tokenizer))
  return metrics


@functools.lru_cache(maxsize=None)
def _eval_task(spec: str, num_fewshot: int):
  from lm.eval import tasks as eval_tasks  # lazy: the metrics' libraries
  return eval_tasks.resolve(spec, num_fewshot=None if num_fewshot < 0 else num_fewshot)


def evaluate_tasks(setup: Setup, params, tokenizer) -> dict:
  """config.eval.tasks on the current params, as eval/TASK/METRIC (lm/eval/harness.py)."""
  from lm.eval import harness
  c = setup.config.eval
  evaluator = harness.Evaluator(setup.model, params, tokenizer, setup.config,
                                batch_size=c.batch_size, seed=c.seed)
  out = {}
  for spec in (s.strip() for s in c.tasks.split(',') if s.strip()):
    result = evaluator.run(_eval_task(spec, c.num_fewshot), limit=c.limit)
    out.update({f'eval/{spec}/{k}': float(v) for k, v in result.metrics.items()})
  return out


def restore_in_layout(restore: Callable, abstract, shardings, saved_scan: bool,
                      scan: bool, device):
  """restore(target) of a params-shaped tree saved with runtime.scan_layers=saved_scan, in
  this run's layout (`scan`) and shardings.

  scan_layers decides the layout (one stacked 'layers' tree or 'layers_0', 'layers_1', ...):
  a tree saved in the other layout is restored in its own, on `device`, and converted.
  """
  if saved_scan == scan:
    return restore(abstract)
  one = jax.sharding.SingleDeviceSharding(device)
  saved = jax.eval_shape(functools.partial(models.relayout, scanned=saved_scan), abstract)
  tree = restore(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                              saved))
  return jax.device_put(jax.jit(functools.partial(models.relayout, scanned=scan))(tree),
                        shardings)


def restore_state(setup: Setup, ckpt, step: int, saved_scan: bool):
  """(state, data state) of checkpoint `step`, onto this run's mesh (Orbax reshards) and
  params layout (restore_in_layout); without the frozen base (saved_state)."""
  data = {}
  def restore(target):
    state, data['state'] = ckpt.restore(step, target)
    return state
  state = restore_in_layout(restore, saved_state(setup.abstract_state),
                            saved_state(setup.state_shardings), saved_scan,
                            setup.config.runtime.scan_layers, setup.mesh.devices.flat[0])
  return state, data['state']


def with_source(setup: Setup, state, source: Callable):
  """`state` with the source's weights (init_from) in place of the fresh ones it has
  (params the source lacks, such as a new classifier or adapters, stay as initialised);
  with adapters the base is split off as state['frozen'] (NF4 for QLoRA)."""
  fresh = full_params(state)
  full = peft_lib.combine(source(setup, fresh), fresh)
  if setup.adapters is None:
    return dict(state, params=jax.device_put(full, setup.state_shardings['params']))
  if setup.adapters.method == 'qlora':
    full = peft_lib.quantize_base(full, setup.adapters)
  if setup.adapters.method == 'prompt' and setup.adapters.prompt_init == 'vocab':
    # The soft prompt from the loaded embeddings of random tokens (its init saw random ones).
    ids = jax.random.randint(jax.random.PRNGKey(setup.config.train.seed),
                             (setup.adapters.num_virtual_tokens,), 0, full['embed'].shape[0])
    full['soft_prompt'] = jnp.take(full['embed'], ids, axis=0).astype(full['soft_prompt'].dtype)
  params, frozen = peft_lib.partition(full, setup.config.peft.train_also)
  return dict(state, params=jax.device_put(params, setup.state_shardings['params']),
              frozen=jax.device_put(frozen, setup.state_shardings['frozen']))


def latest_step(src, what: str) -> int:
  ckpt = ckpt_lib.Checkpointer(src, None, read_only=True)
  step = ckpt.latest_step()
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f'{what}={src} has no checkpoint yet.')
  return step


def restore_run_params(src, saved, runtime, mesh):
  """The newest params of the lm run in `src` (its config `saved`), sharded on `mesh` by
  the logical rules, in `runtime`'s layer layout (scanned or not)."""
  step = latest_step(src, 'run')
  ckpt = ckpt_lib.Checkpointer(src, None, read_only=True)
  target = source_params(saved.model, runtime, mesh)
  try:
    return restore_in_layout(
        lambda target: ckpt.restore_params(step, target), target,
        jax.tree.map(lambda x: x.sharding, target), saved.runtime.scan_layers,
        runtime.scan_layers, mesh.devices.flat[0])
  finally:
    ckpt.close()


def source_params(model_config, runtime, mesh):
  """ShapeDtypeStructs, with their shardings on mesh, of the plain model that model_config
  describes (a source's own params: no adapters, no new heads)."""
  boxed = models.param_shapes(models.get_model(model_config, runtime))
  shardings = nn.unbox(partitioning.logical_shardings(boxed, mesh))
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      nn.unbox(boxed), shardings)


def init_source(config, log: Callable[[str], None] = print):
  """For config.init_from: (config with the source's architecture and tokenizer, tokenizer,
  load), load(setup, fresh params) -> the source's params on setup's mesh (the subset of
  setup's params that the source has; see with_source).

  The source is an lm run directory (config.json + checkpoints/: a training run or an
  imported model) or a Hugging Face model directory (config.json + *.safetensors).
  """
  src = pathlib.Path(config.init_from)
  config = config.copy_and_resolve_references()
  if (src / 'checkpoints').is_dir():
    saved = ckpt_lib.read_config(src)
    if saved.get('quant') and saved.quant.method != 'none':
      raise ValueError(f'init_from={src} is a quantized run ({saved.quant.method}); start from '
                       'the float run it was quantized from.')
    tokenizer = ckpt_lib.read_tokenizer(src)
    step = latest_step(src, 'init_from')

    def load(setup, fresh):
      del fresh
      return restore_run_params(src, saved, config.runtime, setup.mesh)
    what = f'lm run, step {step}'
  elif (src / 'config.json').exists() and list(src.glob('*.safetensors')):
    m, lazy_params, hf_config = hf.import_hf(src, config.runtime.scan_layers)
    saved = None
    tokenizer = hf_tokenizers.from_hf_dir(src, hf_config)
    model_config = hf.model_config(m)

    def load(setup, fresh):
      del fresh
      target = source_params(model_config, config.runtime, setup.mesh)
      return jax.tree.map(lambda t, s: jax.device_put(t().astype(s.dtype), s.sharding),
                          lazy_params, target)
    what = f'Hugging Face {hf.architecture(hf_config)}'
  else:
    raise FileNotFoundError(
        f'init_from={src} is neither an lm run directory (config.json and checkpoints/) nor '
        'a Hugging Face model directory (config.json and *.safetensors).')
  with config.unlocked():
    heads = {k: config.model[k] for k in peft_lib.HEAD_FIELDS if config.model.get(k)}
    # A copy: the new heads set below must not reach the source's own config (its params).
    config.model = copy.deepcopy(saved.model) if saved is not None else model_config
    for k, v in heads.items():
      if k not in config.model:
        raise ValueError(f'model.{k}={v} is not a field of the source model family '
                         f'({config.model.family}).')
      config.model[k] = v
    # The tokenizer is the source's; this run saves its own copy.
    config.data.tokenizer = tokenizer.kind
    config.data.tokenizer_path = ''
  log(f'init_from {src} ({what}): its architecture and tokenizer replace config.model and '
      'config.data.tokenizer.')
  return config, tokenizer, load


def train(config, workdir, log: Callable[[str], None] = print, devices=None) -> dict:
  """Trains (or resumes) per config in workdir; returns the last metrics.

  devices: the devices of the mesh (default: all); a resumed run may use a different
  number (and mesh) than the run that saved it: Orbax reshards on restore.
  """
  workdir = pathlib.Path(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint)
  latest = ckpt.latest_step()
  if latest is not None and not ckpt.has_train_state(latest):
    raise ValueError(
        f'{workdir} holds an imported or exported model (params only), not a training run. '
        f'Fine-tune it in a new run directory: --config.init_from={workdir} '
        '--workdir=NEW_DIR.')

  source = None
  if latest is not None:  # a workdir with checkpoints always resumes
    if config.init_from:  # the source's architecture again (and, with adapters, its base)
      config, _, source = init_source(config, lambda _: None)
    # The tokenizer travels with the run: reuse the saved one.
    tokenizer = (ckpt_lib.read_tokenizer(workdir)
                 if (workdir / ckpt_lib.TOKENIZER_DIR).exists() else
                 lm_data.build_tokenizer(config))
  elif config.init_from:
    config, tokenizer, source = init_source(config, log)
  else:
    tokenizer = lm_data.build_tokenizer(config)
  config = lm_config.resolve(config, tokenizer)
  saved = None
  if latest is not None and (workdir / ckpt_lib.CONFIG_FILE).exists():
    saved = ckpt_lib.read_config(workdir)
    if saved.model.to_dict() != config.model.to_dict():  # architecture only: runtime may change
      diff = {k: (saved.model[k], config.model[k]) for k in config.model
              if saved.model.get(k) != config.model[k]}
      raise ValueError(f'{workdir} holds a run whose model differs from this config '
                       f'(saved, given): {diff}. Use a new --workdir or the same model fields.')

  setup = build(config, devices)
  train_iter = data_iter(setup, tokenizer, 'train')
  if latest is not None:
    layout = saved.runtime.scan_layers if saved is not None else config.runtime.scan_layers
    state, data_state = restore_state(setup, ckpt, latest, layout)
    if setup.adapters is not None:  # the frozen base: config.init_from's, as at the start
      if source is None:
        raise ValueError(f'{workdir} is an adapter run (peft.method='
                         f'{config.peft.method}) but config.init_from is empty: set it to '
                         'the base the run started from.')
      fresh = setup.init_state(jax.random.PRNGKey(config.train.seed))
      state['frozen'] = with_source(setup, fresh, source)['frozen']
    if data_state:
      train_iter.set_state(data_state)
    log(f'Resumed from step {int(state["step"])} in {workdir}.')
  else:
    state = setup.init_state(jax.random.PRNGKey(config.train.seed))
    if source is not None:  # init_from: the source's weights at step 0 of a new run
      state = with_source(setup, state, source)
      state['opt_state'] = jax.jit(setup.tx.init, out_shardings=setup.state_shardings[
          'opt_state'])(state['params'])
      if 'extra' in state:  # e.g. a frozen reference: of the loaded weights, not random ones
        state['extra'] = setup.init_extra(full_params(state))
      log(f'Initialised from the weights of {config.init_from}.')
    loaded = setup.task.load_extra(setup.mesh)  # e.g. a teacher's weights
    if loaded is not None:
      state['extra'] = jax.device_put(loaded, setup.state_shardings['extra'])
  ckpt_lib.write_run_files(workdir, config, tokenizer)

  start = int(state['step'])
  steps = config.train.steps
  # The model's params (adapters included; QLoRA's base counted unquantised), and those
  # that train.
  num_params = models.count_params(full_params(state))
  if setup.adapters is not None:
    plain = models.param_shapes(models.get_model(config.model, config.runtime))
    adapters = peft_lib.partition(state['params'])[0]  # (train_also heads are in plain)
    num_params = models.count_params(plain) + models.count_params(adapters)
  flops_per_token = flops_lib.flops_per_token(setup.model)
  peak_total, peak_how = flops_lib.mesh_peak_flops_per_sec(setup.mesh)
  writer = metrics_lib.MetricsWriter(workdir, steps, start)
  if start == 0 or not writer.path.exists():
    writer.write({'step': start, 'num_params': num_params,
                  'trainable_params': models.count_params(state['params']),
                  'model_flops_per_token': flops_per_token, 'peak_flops_per_sec': peak_total,
                  'peak_flops_how': peak_how, 'config': config.to_dict()})
  tokens_per_step = config.train.batch_size * (
      lm_config.row_length(config) if isinstance(setup.task, tasks.CausalLM)
      else config.model.max_len)

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
        ev = evaluate(setup, state, tokenizer)
        eval_loss = ev[setup.task.best_metric]
        best_eval = eval_loss if best_eval is None else min(best_eval, eval_loss)
        writer.write({'step': done, **ev})
        log(f'step {done}: ' + ', '.join(f"{k.replace('/', ' ')} {v:.4f}" for k, v in ev.items()))
        t_mark = None  # eval time is not training throughput
      stop = preempted.flag
      saving = done % config.checkpoint.every_steps == 0 or done == steps or stop
      if saving:
        settle()
        ckpt.save(done, saved_state(state), train_iter.get_state(), config, eval_loss)
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
