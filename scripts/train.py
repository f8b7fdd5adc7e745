"""Trains (or resumes) a model (CLI contract: docs/architecture.md).

  python scripts/train.py --config=configs/NAME.py --workdir=DIR [--config.a.b=VALUE ...]
  python scripts/train.py --config=configs/llama2_7b.py --workdir=/tmp/x --compile_only \
      --fake_devices=8   # per-device memory of the train step, without the hardware
  python scripts/train.py --config=configs/llama2_7b.py --compile_only --topology=v5p-32
      # the TPU compiler's memory, FLOPs and step-time estimates for a Cloud TPU slice,
      # compiled on this host (needs libtpu: pip install -e '.[tpu]'; lm/train/aot.py)

Re-running the same command resumes from the newest checkpoint in DIR.
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics).')
_COMPILE_ONLY = flags.DEFINE_bool('compile_only', False,
                                  'Compile the train step for the mesh and print its memory.')
_FAKE_DEVICES = flags.DEFINE_integer('fake_devices', 0,
                                     'Simulate this many CPU devices (for --compile_only).')
_TOPOLOGY = flags.DEFINE_string(
    'topology', '', 'With --compile_only: compile for this Cloud TPU slice (v5p-8, v5p-32, '
    'v5e-8, v4-8, v6e-8, ...; lm/train/aot.py) on this host and print the TPU compiler\'s '
    'memory, FLOPs and step-time estimates as one JSON line.')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 1, 'With --topology: slices joined over DCN.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (0..num_processes-1).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from lm.train import host_memory
  host_memory.keep_freed_memory()  # before JAX starts threads; see its docstring
  import jax
  if _TOPOLOGY.value and not _COMPILE_ONLY.value:
    sys.exit('--topology needs --compile_only: it compiles for TPUs this host does not have.')
  if _TOPOLOGY.value and _FAKE_DEVICES.value:
    sys.exit('--topology and --fake_devices are exclusive: the mesh is the topology\'s.')
  if _TOPOLOGY.value:
    from lm.train import aot
    try:
      aot.parse_topology(_TOPOLOGY.value)
    except ValueError as e:
      sys.exit(str(e))
    jax.config.update('jax_platforms', 'cpu')  # the host only compiles: leave its chips be
  if _FAKE_DEVICES.value:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', _FAKE_DEVICES.value)
  from lm import config as lm_config
  from lm.train import partitioning
  config = _CONFIG.value
  try:
    lm_config.check_keys(config)
  except KeyError as e:
    sys.exit(str(e.args[0]))
  if not _TOPOLOGY.value:  # a topology compile is one process, whatever the host
    partitioning.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                              _PROCESS_ID.value)
  from lm.train import trainer
  if _COMPILE_ONLY.value:
    if config.model.vocab_size == 0:
      config = lm_config.resolve(config)
    if _TOPOLOGY.value:
      from lm.train import aot
      report = aot.compile_report(config, _TOPOLOGY.value, _NUM_SLICES.value)
    else:
      report = trainer.compile_only(config)
    print(json.dumps(report), flush=True)
    return
  if not _WORKDIR.value:
    sys.exit('--workdir is required: the directory for checkpoints and metrics.')
  result = trainer.train(config, _WORKDIR.value)
  if result['config'].train.sample_prompt and jax.process_index() == 0:
    from lm.infer import sampling
    print(sampling.sample_text(result['setup'].model, trainer.full_params(result['state']),
                               result['tokenizer'], result['config'].train.sample_prompt,
                               max_new_tokens=result['config'].train.sample_tokens,
                               temperature=0.8, top_k=0, seed=result['config'].train.seed))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
