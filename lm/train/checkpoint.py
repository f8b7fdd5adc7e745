"""Self-describing run directories on Orbax.

    WORKDIR/config.json          the resolved config (also inside every checkpoint)
    WORKDIR/tokenizer/           the tokenizer (lm.data.load_tokenizer reads it back)
    WORKDIR/checkpoints/<step>/  state: params, opt_state, step, rng  (a training run)
                                 or params alone (an imported / exported model)
                                 data: the Grain iterator's state; config: the config

Orbax writes each step into a temporary directory and renames it when complete, so a
kill -9 mid-save leaves nothing that restore would pick up.
"""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections as mlc
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from lm.config import RUNTIME_FIELDS, base_config
from lm.data import load_tokenizer

CONFIG_FILE = 'config.json'
TOKENIZER_DIR = 'tokenizer'


def _small_arrays_whole():
  """Replica-parallel saving (each replica of a replicated array writes a slice of it) only
  for slices of 1 MiB and more: each sliced shape costs a small compile on its first save
  (seconds of a small model's first checkpoint, docs/performance.md) that small arrays
  never repay.
  Orbax's default jax.Array handler otherwise, its metadata store included (it restores
  typed PRNG keys); left as it is where Orbax moved that store."""
  try:  # (Orbax's own imports; the public register_type_handler logs a warning)
    from orbax.checkpoint._src.metadata import array_metadata_store
    from orbax.checkpoint._src.serialization import type_handler_registry
  except ImportError:
    return
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(),
          min_slice_bytes_for_replica_parallel=1 << 20), override=True, ignore_warnings=True)


_small_arrays_whole()


def config_to_json(config: mlc.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def _migrate(saved: dict) -> dict:
  """Moves fields of configs saved before the model/runtime/task split to their place."""
  model, train = saved.get('model', {}), saved.get('train', {})
  runtime = saved.setdefault('runtime', {})
  for k in RUNTIME_FIELDS:
    if k in model:
      runtime.setdefault(k, model.pop(k))
  if 'cpu_matmuls' in train:
    runtime.setdefault('cpu_matmuls', train.pop('cpu_matmuls'))
  task = saved.setdefault('task', {})
  if 'objective' in train:
    task.setdefault('name', train.pop('objective'))
  if 'z_loss' in train:
    task.setdefault('z_loss', train.pop('z_loss'))
  return saved


def config_from_json(text: str) -> mlc.ConfigDict:
  """Rebuilds a locked config on the schema, so old runs pick up new default fields."""
  saved = _migrate(json.loads(text))
  config = base_config(saved.get('model', {}).get('family', 'decoder'))
  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst and isinstance(dst[k], mlc.ConfigDict):
        merge(dst[k], v)
      elif k in dst:
        dst[k] = type(dst[k])(v) if isinstance(dst[k], (int, float)) and not isinstance(
            dst[k], bool) and v is not None else v
  merge(config, saved)
  return config


def write_run_files(workdir, config, tokenizer) -> None:
  """Config and tokenizer beside the checkpoints (process 0 writes)."""
  workdir = pathlib.Path(workdir)
  if jax.process_index() != 0:
    return
  workdir.mkdir(parents=True, exist_ok=True)
  tmp = workdir / (CONFIG_FILE + '.tmp')
  tmp.write_text(config_to_json(config))
  tmp.replace(workdir / CONFIG_FILE)
  if tokenizer is not None:
    tokenizer.save(workdir / TOKENIZER_DIR)


def read_config(workdir) -> mlc.ConfigDict:
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist: --workdir={workdir} is not an lm run directory. Pass the '
        'directory that scripts/train.py or scripts/convert_checkpoint.py wrote.')
  return config_from_json(path.read_text())


def read_tokenizer(workdir):
  return load_tokenizer(pathlib.Path(workdir) / TOKENIZER_DIR)


class Checkpointer:
  """Keeps the last `keep` checkpoints plus the best by eval loss; saves async."""

  def __init__(self, workdir, checkpoint_config=None, read_only: bool = False):
    cc = checkpoint_config
    policies = [cm.LatestN(cc.keep if cc else 2)]
    if cc is None or cc.keep_best:
      policies.append(cm.BestN(get_metric_fn=lambda m: m['eval_loss'], reverse=True, n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=bool(cc.async_save) if cc else False,
        create=not read_only)  # (Orbax's read_only mode only adds warnings)
    self.directory = pathlib.Path(workdir).absolute() / 'checkpoints'
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def has_train_state(self, step: int) -> bool:
    return (self.directory / str(step) / 'state').exists()

  def save(self, step: int, state, data_state=None, config=None, eval_loss=None) -> None:
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(data_state or {}))
    if config is not None:
      items['config'] = ocp.args.JsonSave(json.loads(config_to_json(config)))
    metrics = None if eval_loss is None else {'eval_loss': float(eval_loss)}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def save_params(self, step: int, params, config=None) -> None:
    items = dict(params=ocp.args.StandardSave(params))
    if config is not None:
      items['config'] = ocp.args.JsonSave(json.loads(config_to_json(config)))
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state):
    """(state, data_state); abstract_state carries the target shardings (any mesh)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out['state'], out['data']

  def restore_params(self, step: int, abstract_params):
    """Params alone, from a training checkpoint or a params-only one."""
    if self.has_train_state(step):
      item, target = 'state', {'params': abstract_params}
    else:
      item, target = 'params', abstract_params
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    out = self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    return out['params'] if item == 'state' else out

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def derived_run_config(workdir, out, verb: str) -> mlc.ConfigDict:
  """The config of a new run `out` made from the float weights of the run in `workdir`
  (LoRA merged: peft none, no init_from), after refusing what cannot be: a non-empty `out`,
  a quantized run, a prompt- or prefix-tuned one (its soft prompt is no weight). `verb`
  names the operation in the errors ('quantize', 'prune')."""
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f'--out={out} exists and is not empty; give a new directory.')
  config = read_config(workdir)
  if config.get('quant') and config.quant.method != 'none':
    raise ValueError(f'{workdir} is quantized already ({config.quant.method}); {verb} the '
                     'float run it came from.')
  if config.peft.method in ('prompt', 'prefix'):
    raise ValueError(f'{workdir} is a {config.peft.method}-tuning run: its soft prompt cannot '
                     f'be merged into the weights; {verb} its base ({config.init_from}).')
  new = config.copy_and_resolve_references()
  new.peft.method, new.init_from = 'none', ''
  return new


def save_inference_run(workdir, params, config, tokenizer, step: int = 0) -> None:
  """A run directory holding params (no optimizer state): for imported models."""
  write_run_files(workdir, config, tokenizer)
  ckpt = Checkpointer(workdir, None)
  ckpt.save_params(step, params, config)
  ckpt.close()
