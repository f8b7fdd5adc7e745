"""Times the real train step (or the input pipeline); the last line is one JSON object.

  python scripts/benchmark.py --config=configs/NAME.py [--steps=N] [--config.a.b=...]
  python scripts/benchmark.py --config=configs/NAME.py --data_only

Train step: synthetic tokens through the same jitted, sharded step that train.py uses.
Prints tokens_per_sec, model_flops_per_token (6N + 12 L D T, see lm/train/flops.py),
model_flops_per_sec, peak_flops_per_sec (a dense matmul timed in this process on this
device on CPU; the spec sheet on GPU/TPU) and mfu, their ratio.
"""
import json
import resource
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps (compilation, caches), then four '
                               'more at a time until the heap settles (see main).')
_DATA_ONLY = flags.DEFINE_bool('data_only', False, 'Time the input pipeline alone.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from lm.train import host_memory
  host_memory.keep_freed_memory()  # before JAX starts threads; see its docstring
  import jax
  import numpy as np
  from lm import config as lm_config
  config = _CONFIG.value
  if _DATA_ONLY.value:
    from lm.data import pipeline
    print(json.dumps({'data_tokens_per_sec': pipeline.measure_throughput(config)}))
    return
  from lm.train import flops, trainer
  if config.init_from:  # fine-tuning: the source's architecture (its weights are not read)
    config = trainer.init_source(config, lambda _: None)[0]
  if config.model.vocab_size == 0:
    config = lm_config.resolve(config)
  setup = trainer.build(config)
  # The peak first: its buffers would otherwise displace the step's in the kept heap
  # (host_memory) and fault ~1 GB back in on each of the next few steps.
  peak, how = flops.mesh_peak_flops_per_sec(setup.mesh)
  state = setup.init_state(jax.random.PRNGKey(0))
  (b, t), v = setup.task.batch_spec()['inputs'][0], config.model.vocab_size  # (prompt
  # tuning's rows are shorter by its soft prompt)
  rng = np.random.default_rng(0)
  def batch():
    x = rng.integers(0, v, (b, t + 1), dtype=np.int32)
    return dict(inputs=x[:, :-1], targets=x[:, 1:], segment_ids=np.ones((b, t), np.int32),
                positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                weights=np.ones((b, t), np.float32))
  # train.steps_per_call = k > 1: k steps per call (setup.train_steps), as train.py runs them.
  k = config.train.steps_per_call
  if k > 1:
    step_fn = setup.train_steps
    batches = [trainer.global_batches(setup, [batch() for _ in range(k)]) for _ in range(2)]
  else:
    step_fn = setup.train_step
    batches = [trainer.global_batch(setup, batch()) for _ in range(4)]
  page_faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

  def run(steps):
    """As train.py: at most two calls in flight. Runs `steps` rounded up to a multiple of
    k; returns (steps run, the page faults they took)."""
    nonlocal state
    faults, previous = page_faults(), None
    calls = -(-steps // k)
    for i in range(calls):
      state, metrics = step_fn(state, batches[i % len(batches)])
      if previous is not None:
        jax.block_until_ready(previous)
      previous = metrics
    jax.block_until_ready((state, metrics))
    return calls * k, page_faults() - faults

  # The kept heap (lm/train/host_memory.py) grows over the first steps, each faulting a
  # fresh copy of the step's temporaries in (0.66 GB on shakespeare_char_gpu; such a step
  # takes 1.2-2x a settled one's time): a one-off that a long run does not see. So the
  # warm-up goes on, four steps (or one call of k) at a time, until they fault in under
  # 8 MB per four steps (at most 30 steps).
  warmup = run(_WARMUP.value)[0]
  while warmup < 30:
    ran, faults = run(4)
    warmup += ran
    if faults < 2000 * ran / 4:
      break
  start = time.perf_counter()
  steps, faults = run(_STEPS.value)
  seconds = time.perf_counter() - start
  # The peak is a best case: timed again after the steps, the larger of the two, so a
  # slow second on this shared machine cannot shrink the denominator (MFU > 1 seen).
  peak = max(peak, flops.mesh_peak_flops_per_sec(setup.mesh)[0])
  tokens_per_sec = b * t * steps / seconds
  fpt = flops.flops_per_token(setup.model)
  print(json.dumps({
      'config': config.model.to_dict() | config.runtime.to_dict() | {'batch_size': b},
      'device': jax.devices()[0].device_kind, 'num_devices': len(setup.mesh.devices.flat),
      'warmup_steps': warmup, 'steps': steps, 'steps_per_call': k,
      'seconds_per_step': seconds / steps, 'page_faults_per_step': faults / steps,
      'peak_how': how,
      'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
  print(json.dumps(flops.speed_report(tokens_per_sec, fpt, peak)))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
