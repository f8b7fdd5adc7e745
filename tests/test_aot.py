"""Ahead-of-time compiles for TPU topologies on this CPU host (lm/train/aot.py).

Every figure checked here is the TPU compiler's estimate; no TPU is needed, only libtpu.
"""
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip('libtpu', reason='needs libtpu (pip install -e ".[tpu]")')

from lm.config import base_config, gpt2_model, llama_model  # noqa: E402
from conftest import subprocess_env  # noqa: E402
from lm.train import aot  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(family: str, n_layers: int = 2, **runtime):
  c = base_config()
  model = gpt2_model if family == 'gpt2' else llama_model
  c.model.update(model(vocab_size=256, max_len=64, n_layers=n_layers, d_model=64, n_heads=4,
                       **({} if family == 'gpt2' else dict(n_kv_heads=2, d_ff=128))))
  c.runtime.update(runtime)
  c.train.update(batch_size=8, steps=10)
  return c


@pytest.mark.parametrize('name, devices', [
    ('v5p-8', 4), ('v5p-32', 16), ('v5e-8', 8), ('v5litepod-4', 4), ('v4-8', 4), ('v6e-8', 8),
    ('v5p:2x2x2', 8)])
def test_topology_devices(name, devices):
  got = aot.topology_devices(name)
  assert len(got) == devices
  assert all(d.platform == 'tpu' for d in got)
  assert len({tuple(d.coords) for d in got}) == devices  # one device per chip


def test_topology_slices_and_unknown_names():
  assert len(aot.topology_devices('v5e-4', num_slices=2)) == 8
  for bad in ('v5p-7', 'v5e-2', 'v9-8', 'tpu'):
    with pytest.raises(ValueError, match='Known: v4-8, .*v5p-32'):
      aot.parse_topology(bad)


def check_report(r, topology, devices):
  assert r['topology'] == topology and r['devices'] == devices
  assert r['fits'] is True
  assert isinstance(r['hbm_bytes_per_device'], int) and r['hbm_bytes_per_device'] > 0
  assert r['hbm_bytes_per_device'] < r['hbm_capacity_bytes']
  assert r['model_flops_per_step'] > 0 and r['compiler_flops_per_step'] > 0
  assert 0.3 < r['compiler_flops_per_step'] / r['model_flops_per_step'] < 3
  s = r['estimated_step_seconds']
  assert s is None or (isinstance(s, float) and s > 0)
  if s is not None:
    assert 0 < r['estimated_mfu'] < 1
  assert r['estimate_while_loops'] == 0
  json.dumps(r)  # one JSON object


def test_compile_report_v5e_unrolled():
  r = aot.compile_report(tiny('gpt2'), 'v5e-4')
  check_report(r, 'v5e-4', 4)
  assert r['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert r['hbm_capacity_bytes'] == 16 * 2 ** 30
  assert r['while_loops'] == 0  # nothing to estimate around: one compile
  assert r['estimate_from'] == 'the program as configured'


def test_compile_report_v5p_scanned_fsdp():
  c = tiny('llama', n_layers=3, scan_layers=True, remat='full', dtype='bfloat16')
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  r = aot.compile_report(c, 'v5p-8')
  check_report(r, 'v5p-8', 4)
  assert r['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert r['hbm_capacity_bytes'] == 95 * 2 ** 30
  # The scanned layers are while loops (costed once, not per layer): the estimate comes
  # from unrolled variants with 1 and 2 layers, extrapolated to 3, which have none.
  assert r['while_loops'] > 0
  assert r['estimate_from'].startswith('loop-free variants with 1 and 2 layers')
  assert r['estimated_step_seconds'] > 0
  # ... and agrees with all 3 layers unrolled (estimate='full').
  cost, facts, how = aot._estimate(c, aot.topology_devices('v5p-8'), 'full')
  assert how.startswith('loop-free variant (') and facts['while_loops'] == 0
  assert abs(r['compiler_flops_per_device'] / cost['flops'] - 1) < 0.02
  assert abs(r['estimated_step_seconds'] / cost['seconds'] - 1) < 0.3


def test_uncosted_ops_are_added_back():
  """cost_analysis charges -1 s per op it has no cost for (sliced prefetches' ConcatBitcast,
  multislice's SliceId and ZeroCrop); the report adds them back."""
  c = tiny('llama')
  c.mesh.update(data=2, fsdp=-1, tensor=1)
  r = aot.compile_report(c, 'v5e-4', num_slices=2)
  check_report(r, 'v5e-4', 8)
  assert r['num_slices'] == 2 and r['uncosted_ops'] > 0
  assert r['estimated_step_seconds'] < 0.01  # a tiny step; the raw figure is about -uncosted


def test_cli_compile_only_topology():
  env = subprocess_env(devices=1)  # one CPU device here
  out = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=configs/tiny_gpt2.py', '--compile_only',
       '--topology=v5e-4', '--config.model.vocab_size=256'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  check_report(r, 'v5e-4', 4)
  bad = subprocess.run([sys.executable, 'scripts/train.py', '--config=configs/tiny_gpt2.py',
                        '--compile_only', '--topology=v5p-6'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and 'Known: v4-8' in bad.stderr
