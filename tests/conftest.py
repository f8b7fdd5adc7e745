"""Test setup: 8 fake CPU devices so sharding is exercised without accelerators."""
import os

# Must happen before JAX is imported anywhere. LLVM's -O0 for XLA:CPU: the suite compiles
# hundreds of tiny programs and runs each a few times, so compiling dominates (-22% on a
# compile-bound test); scripts the tests start get the same flag (same numerics).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAG}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session and the scripts it runs: most tests
# compile the same small train steps again (resumes, CLIs, two processes), and on 2 cores
# compiling is most of the suite's time. Removed at exit.
import atexit
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="lm_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Scripts and notebooks run here log MFU against a fixed peak instead of timing a matmul
# (8-10 s a process on 2 cores); the benchmark tests unset it and time the real one.
os.environ.setdefault("LM_PEAK_FLOPS", "1e12")

import pathlib

import pytest


def subprocess_env(devices=1, **extra) -> dict:
  """The environment for a script a test starts: CPU, `devices` fake devices, the suite's
  XLA flags, the project on the path."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).parents[1]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAG}")
  env.update(extra)
  return env


SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shakespeare_path():
  path = SHARED_DATA / "tinyshakespeare.txt"
  if not path.exists():
    pytest.skip(f"{path} is absent")
  return path


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS data dir per session: the default corpus is built once, not per test."""
  return tmp_path_factory.mktemp('tfds')


def pytest_collection_modifyitems(config, items):
  """PyTorch (the Hugging Face references, imported while collecting) on one thread: its
  spinning worker threads starve JAX's on 2 cores (a 0.1 s generate took 7 s)."""
  del config, items
  import sys
  torch = sys.modules.get('torch')
  if torch is not None:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _untimed_peak(monkeypatch):
  """No timed peak matmul in this process (seconds on 2 cores, once per worker): the runs
  here log MFU against a fixed peak. Scripts and notebooks (subprocesses) still time it."""
  from lm.train import flops
  monkeypatch.setattr(flops, 'mesh_peak_flops_per_sec', lambda mesh: (1e12, 'test'))
