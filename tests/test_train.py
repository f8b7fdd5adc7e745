"""The trainer: sharding equivalence, accumulation, resume, remesh, preemption, guards, CLI."""
import dataclasses
import gc
import importlib.util
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time
import weakref

import jax
import numpy as np
import pytest

from lm.config import base_config, check_keys
from lm.infer.load import load_run
from lm.train import checkpoint as ckpt_lib
from lm.train import metrics as metrics_lib
from lm.train import trainer
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **train):
  c = base_config()
  c.model.update(vocab_size=0, max_len=32, d_model=32, n_layers=2, n_heads=2)
  c.data.update(dataset='default', tokenizer='bytes', data_dir=str(data_dir))
  c.train.update(batch_size=8, steps=20, log_every=1, eval_every=10, eval_steps=2, seed=3)
  c.train.update(train)
  c.optimizer.update(warmup_steps=2, lr=3e-3, decay_steps=20)  # same schedule at any steps
  c.checkpoint.update(every_steps=5, keep=3, async_save=False)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c


def synthetic_batches(n, b=8, t=32, v=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, v, (b, t + 1)).astype(np.int32)
  for _ in range(n):  # the same batch each step, so the loss must fall
    yield dict(inputs=x[:, :-1], targets=x[:, 1:], segment_ids=np.ones((b, t), np.int32),
               positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
               weights=(np.arange(t) % 3 != 0).astype(np.float32)[None].repeat(b, 0))


def synthetic_config(**mesh):
  c = base_config()
  c.model.update(vocab_size=64, max_len=32, d_model=64, n_layers=2, n_heads=4)
  c.train.update(batch_size=8, steps=10)
  # SGD: Adam's normalisation turns float rounding in near-zero gradients into
  # lr-sized parameter differences, which would hide real mismatches.
  c.optimizer.update(name='sgd', warmup_steps=0, lr=0.5, weight_decay=0.0)
  c.mesh.update(mesh)
  return c


def run_steps(config, devices, n=3):
  setup = trainer.build(config, devices)
  state = setup.init_state(jax.random.PRNGKey(0))
  losses = []
  for batch in synthetic_batches(n):
    state, m = setup.train_step(state, trainer.global_batch(setup, batch))
    losses.append(float(m['train/loss']))
  return losses, jax.device_get(state['params'])


def test_one_device_equals_eight_as_2x2x2():
  l1, p1 = run_steps(synthetic_config(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  l8, p8 = run_steps(synthetic_config(data=2, fsdp=2, tensor=2), jax.devices())
  np.testing.assert_allclose(l1, l8, atol=1e-5)
  assert l1[2] < l1[0]  # it learns
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p8)


def test_params_are_sharded_by_logical_rules():
  setup = trainer.build(synthetic_config(data=2, fsdp=2, tensor=2))
  spec = setup.state_shardings['params']['layers_0']['attn']['query']['kernel'].spec
  assert tuple(spec) == ('fsdp', 'tensor', None)  # embed -> fsdp, heads -> tensor
  # Optimizer moments follow their params.
  flat = jax.tree_util.tree_flatten_with_path(setup.state_shardings['opt_state'])[0]
  specs = [tuple(s.spec) for path, s in flat if 'layers_0' in str(path) and 'wi' in str(path)
           and 'kernel' in str(path)]
  assert specs and all(s == ('fsdp', 'tensor') for s in specs)


def test_gradient_accumulation_equals_big_batch():
  big, p_big = run_steps(synthetic_config(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  c = synthetic_config(data=1, fsdp=1, tensor=1)
  c.train.microbatches = 4
  acc, p_acc = run_steps(c, jax.devices()[:1])
  np.testing.assert_allclose(big, acc, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), p_big, p_acc)


def test_fused_adamw_step_matches_optax(monkeypatch):
  """On one CPU device AdamW runs as one C++ op (optim.fused_update); same training."""
  monkeypatch.setenv('LM_CPU_KERNELS', 'force')  # the seam keeps XLA on AVX2-only CPUs
  def steps(fused):
    c = synthetic_config(data=1, fsdp=1, tensor=1)
    c.optimizer.update(name='adamw', lr=1e-2, weight_decay=0.1, grad_clip=0.5, fused=fused)
    setup = trainer.build(c, jax.devices()[:1])
    state = setup.init_state(jax.random.PRNGKey(0))
    batch = trainer.global_batch(setup, next(synthetic_batches(1)))
    hlo = setup.train_step.lower(state, batch).as_text()
    losses = []
    for _ in range(3):
      state, m = setup.train_step(state, batch)
      losses.append(float(m['train/loss']))
    return hlo, losses, jax.device_get(state)
  hlo_f, l_f, s_f = steps(True)
  hlo_o, l_o, s_o = steps(False)
  assert 'LmAdamW' in hlo_f and 'LmAdamW' not in hlo_o
  np.testing.assert_allclose(l_f, l_o, rtol=1e-5)
  assert l_f[2] < l_f[0]
  # Adam turns rounding in near-zero gradients into small update differences (see
  # synthetic_config); tests/test_optim.py checks the arithmetic itself to 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), s_f, s_o)


def test_onednn_matmuls_match_the_default():
  c = synthetic_config(data=2, fsdp=2, tensor=2)
  ref, p_ref = run_steps(c, jax.devices())
  c.runtime.cpu_matmuls = 'onednn'
  setup = trainer.build(c)
  batch = trainer.global_batch(setup, next(synthetic_batches(1)))
  hlo = setup.train_step.lower(setup.abstract_state, batch).compile().as_text()
  assert 'onednn' in hlo
  got, p_got = run_steps(c, jax.devices())
  np.testing.assert_allclose(ref, got, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p_ref, p_got)
  c.runtime.cpu_matmuls = 'mkl'
  with pytest.raises(ValueError, match="cpu_matmuls must be 'ynn' or 'onednn'"):
    trainer.build(c)


def test_onednn_executables_outlive_their_callers():
  # Freeing a oneDNN executable just after it ran can abort the process (an XLA:CPU race),
  # so flops.jit keeps such functions; plain ones are freed as usual.
  from lm.train import flops
  a = np.ones((64, 64), np.float32)
  kept, freed = (weakref.ref(flops.jit(lambda x: x @ x, compiler_options=options))
                 for options in (flops.ONEDNN_OPTIONS, None))
  np.testing.assert_allclose(kept()(a), a @ a)
  gc.collect()
  assert kept() is not None and freed() is None


def losses_of(workdir):
  return {r['step']: r['train/loss'] for r in metrics_lib.read_metrics(workdir)
          if 'train/loss' in r}


def test_resume_is_bitwise_exact(data_dir, tmp_path):
  c = tiny_config(data_dir)
  trainer.train(c, tmp_path / 'once', log=lambda s: None)
  c10 = tiny_config(data_dir, steps=10)
  trainer.train(c10, tmp_path / 'twice', log=lambda s: None)
  trainer.train(c, tmp_path / 'twice', log=lambda s: None)  # same command, more steps
  once, twice = losses_of(tmp_path / 'once'), losses_of(tmp_path / 'twice')
  assert sorted(once) == sorted(twice) == list(range(1, 21))
  assert [once[s] for s in range(1, 21)] == [twice[s] for s in range(1, 21)]  # bitwise
  assert once[20] < once[1]
  records = metrics_lib.read_metrics(tmp_path / 'once')
  assert 'num_params' in records[0] and 'config' in records[0]
  for key in ('train/loss', 'train/lr', 'train/grad_norm', 'train/tokens_per_sec', 'train/mfu'):
    assert key in records[1]
  evals = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [10, 20] and 'eval/perplexity' in evals[0]
  assert (tmp_path / 'once' / 'loss.png').stat().st_size > 1000
  assert list((tmp_path / 'once' / 'tensorboard').glob('events.out.tfevents.*'))
  assert (tmp_path / 'once' / 'config.json').exists()
  assert (tmp_path / 'once' / 'tokenizer').is_dir()


def test_steps_per_call_matches_one_step_per_call(data_dir, tmp_path, monkeypatch):
  """train.steps_per_call=3 (lax.scan over 3 steps a call): the losses, evals and params of
  one step per call, and a call that would pass a log, eval or save step is split."""
  calls, real_build = [], trainer.build
  def build(config, devices=None):  # count the K-step calls
    setup = real_build(config, devices)
    if setup.train_steps is None:
      return setup
    f = setup.train_steps
    return dataclasses.replace(setup, train_steps=lambda s, b: calls.append(1) or f(s, b))
  monkeypatch.setattr(trainer, 'build', build)
  runs = {}
  for k in (1, 3):
    c = tiny_config(data_dir, steps=12, log_every=4, eval_every=6, steps_per_call=k)
    c.checkpoint.update(every_steps=6)
    out = trainer.train(c, tmp_path / f'k{k}', log=lambda s: None)
    evals = {r['step']: r['eval/loss'] for r in metrics_lib.read_metrics(tmp_path / f'k{k}')
             if 'eval/loss' in r}
    runs[k] = losses_of(tmp_path / f'k{k}'), evals, jax.device_get(out['state']['params'])
  assert len(calls) == 2  # steps 1-3 and 10-12; the steps between meet log/eval/save steps
  (l1, e1, p1), (l3, e3, p3) = runs[1], runs[3]
  assert sorted(l1) == sorted(l3) == [4, 8, 12] and sorted(e1) == sorted(e3) == [6, 12]
  np.testing.assert_allclose([l3[s] for s in l1], [l1[s] for s in l1], rtol=1e-5)
  np.testing.assert_allclose([e3[s] for s in e1], [e1[s] for s in e1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p1, p3)
  assert [trainer.steps_this_call(c, s) for s in range(12)] == [3, 1, 1, 1, 1, 1, 1, 1, 1,
                                                                3, 1, 1]


def test_kept_heap_is_released_after_evals_and_saves(data_dir, tmp_path, monkeypatch):
  """Evaluation and checkpointing fragment the kept heap (lm/train/host_memory.py): the loop
  hands its free pages back after each, not after other steps."""
  released = []
  monkeypatch.setattr(trainer.host_memory, 'release_free_memory', lambda: released.append(1))
  c = tiny_config(data_dir, steps=6, log_every=2, eval_every=4)
  c.checkpoint.update(every_steps=3)
  trainer.train(c, tmp_path / 'run', log=lambda s: None)
  assert len(released) == 3  # after the save at 3, the eval at 4, the eval and save at 6


def test_restore_onto_a_different_mesh(data_dir, tmp_path):
  c = tiny_config(data_dir, steps=4, eval_every=0)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  trainer.train(c, tmp_path / 'run', log=lambda s: None)
  # The uninterrupted reference on the first run's mesh: its step compiled once (the cache).
  c.train.steps = 6
  trainer.train(c, tmp_path / 'ref', log=lambda s: None)
  for devices, mesh in [(jax.devices()[:4], dict(data=1, fsdp=2, tensor=2))]:  # 8 -> 4
    work = tmp_path / f'run{len(devices)}'
    subprocess.run(['cp', '-r', str(tmp_path / 'run'), str(work)], check=True)
    c6 = tiny_config(data_dir, steps=6, eval_every=0)
    c6.mesh.update(mesh)
    out = trainer.train(c6, work, log=lambda s: None, devices=devices)
    assert out['step'] == 6
    # Same data stream and state as a run that was never interrupted.
    got, want = losses_of(work), losses_of(tmp_path / 'ref')
    np.testing.assert_allclose([got[s] for s in (5, 6)], [want[s] for s in (5, 6)], atol=1e-4)


# 8 devices update with optax's ops; one device with the fused C++ AdamW (optim.fused_update).
@pytest.mark.parametrize('steps_per_call,n_devices', [(1, 8), (2, 1)])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch,
                                                              steps_per_call, n_devices):
  from lm import data as lm_data
  real = lm_data.make_train_iter

  class Poisoned:
    def __init__(self, it):
      self.it, self.n = it, 0
    def __next__(self):
      batch = dict(next(self.it))
      self.n += 1
      if self.n == 8:  # the batch of step 8 carries a NaN weight
        batch['weights'] = batch['weights'] * np.nan
      return batch
    def get_state(self):
      return self.it.get_state()
    def set_state(self, s):
      self.it.set_state(s)

  monkeypatch.setattr(lm_data, 'make_train_iter', lambda *a, **k: Poisoned(real(*a, **k)))
  # Step 8 evaluates and logs no metrics; with 2 steps a call, steps 7 and 8 share one.
  c = tiny_config(data_dir, log_every=5, eval_every=4, steps_per_call=steps_per_call)
  with pytest.raises(FloatingPointError, match='step 8 '):
    trainer.train(c, tmp_path / 'run', log=lambda s: None, devices=jax.devices()[:n_devices])
  lines = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in lines if 'eval/loss' in x] == [4]  # the bad state is not evaluated
  ckpt = ckpt_lib.Checkpointer(tmp_path / 'run', c.checkpoint)
  assert ckpt.latest_step() == 5
  _, params, _, _ = load_run(tmp_path / 'run')
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_unknown_config_key_is_rejected_with_neighbours():
  c = base_config()
  with pytest.raises((KeyError, AttributeError)):
    c.train.stpes = 5  # locked
  from ml_collections import ConfigDict
  bad = ConfigDict({'train': {'stpes': 5}})
  with pytest.raises(KeyError, match=r"train\.steps"):
    check_keys(bad)


def run_script(args, devices=1, timed_peak=False, **kw):
  """timed_peak: the script times its peak matmul (conftest fixes LM_PEAK_FLOPS otherwise)."""
  env = subprocess_env(devices)
  if timed_peak:
    env.pop('LM_PEAK_FLOPS', None)
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, **kw)


def test_compile_only_reports_memory():
  out = run_script(['scripts/train.py', '--config=configs/tiny_llama.py', '--compile_only',
                    '--fake_devices=8', '--config.mesh.data=1', '--config.mesh.fsdp=8'])
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert report['total_per_device_bytes'] > 0 and report['num_params'] > 0


def wait_for(predicate, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.2)
  return False


def tiny_gpt2_config():
  """configs/tiny_gpt2.py's config, as the scripts below load it."""
  spec = importlib.util.spec_from_file_location('tiny_gpt2', ROOT / 'configs/tiny_gpt2.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train_cmd(data_dir, workdir, steps, every=2):
  return ['scripts/train.py', '--config=configs/tiny_gpt2.py', f'--workdir={workdir}',
          f'--config.train.steps={steps}', '--config.train.log_every=1',
          f'--config.checkpoint.every_steps={every}', '--config.train.eval_every=0',
          f'--config.data.data_dir={data_dir}']


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  work = tmp_path / 'w'
  proc = subprocess.Popen([sys.executable, *train_cmd(data_dir, work, 100000, every=100000)],
                          cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert wait_for(lambda: (work / 'metrics.jsonl').exists() and
                  len((work / 'metrics.jsonl').read_text().splitlines()) > 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM' in out
  step = ckpt_lib.Checkpointer(work, None, read_only=True).latest_step()
  assert step and step >= 3


def test_kill_9_during_saves_never_leaves_a_half_checkpoint(data_dir, tmp_path):
  work = tmp_path / 'w'
  proc = subprocess.Popen([sys.executable, *train_cmd(data_dir, work, 100000, every=1)],
                          cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  assert wait_for(lambda: (work / 'metrics.jsonl').exists() and
                  len((work / 'metrics.jsonl').read_text().splitlines()) > 6)
  proc.kill()  # SIGKILL while saving every step
  proc.wait()
  latest = ckpt_lib.Checkpointer(work, None, read_only=True).latest_step()
  saved = json.loads((work / 'config.json').read_text())  # the CLI's overrides, recorded
  assert saved['train']['steps'] == 100000 and saved['checkpoint']['every_steps'] == 1
  # The same run resumed in this process (on one device, as the script ran): the latest
  # checkpoint restores whole, and two more steps save.
  c = tiny_gpt2_config()
  c.train.update(steps=latest + 2, log_every=1, eval_every=0)
  c.checkpoint.every_steps, c.data.data_dir = 1, str(data_dir)
  logged = []
  out = trainer.train(c, work, log=logged.append, devices=jax.devices()[:1])
  assert f'Resumed from step {latest} in {work}.' in logged and out['step'] == latest + 2
  assert ckpt_lib.Checkpointer(work, None, read_only=True).latest_step() == latest + 2


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(data_dir, tmp_path):
  common = ['scripts/train.py', '--config=configs/tiny_gpt2.py', '--config.train.steps=4',
            '--config.train.log_every=1', '--config.train.eval_every=0',
            f'--config.data.data_dir={data_dir}', '--config.checkpoint.async_save=false']
  c = tiny_gpt2_config()  # the same run in this process, on two of its devices
  c.train.update(steps=4, log_every=1, eval_every=0)
  c.data.data_dir, c.checkpoint.async_save = str(data_dir), False
  trainer.train(c, tmp_path / 'one', log=lambda s: None, devices=jax.devices()[:2])
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, *common, f'--workdir={tmp_path}/two',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
      cwd=ROOT, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  one, two = losses_of(tmp_path / 'one'), losses_of(tmp_path / 'two')
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([one[s] for s in one], [two[s] for s in one], atol=1e-5)


def test_lm_peak_flops_overrides_the_timed_peak(monkeypatch):
  from lm.train import flops
  monkeypatch.setenv('LM_PEAK_FLOPS', '2.5e12')
  assert flops.peak_flops_per_sec() == (2.5e12, 'LM_PEAK_FLOPS')
  monkeypatch.setenv('LM_PEAK_FLOPS', 'fast')
  with pytest.raises(ValueError, match='LM_PEAK_FLOPS'):
    flops.peak_flops_per_sec()


def test_nanogpt_reference_counts_flops_as_the_benchmark():
  pytest.importorskip('torch')  # the test extras install it
  args = ['--config=configs/tiny_gpt2.py', '--steps=2', '--config.model.vocab_size=64',
          '--config.model.d_model=32', '--config.model.use_bias=False']  # as nanoGPT's default
  out = run_script(['scripts/benchmark_nanogpt.py', *args])
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  from lm import models
  from lm.train import flops
  c = tiny_gpt2_config()
  c.model.update(vocab_size=64, d_model=32, use_bias=False)
  assert result['model_flops_per_token'] == flops.flops_per_token(models.get_model(c.model))
  assert result['tokens_per_sec'] > 0 and 0 < result['mfu'] < 1
  llama = run_script(['scripts/benchmark_nanogpt.py', '--config=configs/tiny_llama.py'])
  assert llama.returncode != 0 and 'GPT-2 style' in llama.stderr


def test_benchmark_prints_the_metrics_contract():
  # Two steps a call (train.steps_per_call): --steps rounds up to whole calls.
  out = run_script(['scripts/benchmark.py', '--config=configs/tiny_gpt2.py', '--steps=3',
                    '--warmup=1', '--config.model.vocab_size=64', '--config.model.d_model=32',
                    '--config.train.steps_per_call=2'], timed_peak=True)
  assert out.returncode == 0, out.stderr[-3000:]
  info, result = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
  assert info['steps'] == 4 and info['steps_per_call'] == 2
  assert 5 <= info['warmup_steps'] <= 30  # 1, then groups of 4 (steps)
  assert info['page_faults_per_step'] >= 0
  assert result['tokens_per_sec'] > 0 and 0 < result['mfu'] < 1
  assert result['model_flops_per_sec'] == pytest.approx(
      result['tokens_per_sec'] * result['model_flops_per_token'])
