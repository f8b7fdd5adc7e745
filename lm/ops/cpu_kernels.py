"""The C++ kernels for XLA:CPU (cpu_*.cc, cpu_kernels.h): build, load, register.

The sources are compiled together, on first use, with the system's C++ compiler for this
machine (-march=native) against the XLA FFI headers that ship in jaxlib, and cached under
~/.cache/lm/kernels keyed by the sources, jaxlib's version and the CPU; set LM_KERNEL_DIR to
move the cache. Without a compiler, or with LM_CPU_KERNELS=0, `available()` is False (the
reason in `unavailable_reason()`) and the models use the XLA versions of attention, norms,
dense layers and GELU, which compute the same. lm/ops/backend.py decides where they run.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

_DIR = pathlib.Path(__file__).parent
SOURCES = (_DIR / 'cpu_attention.cc', _DIR / 'cpu_norm.cc', _DIR / 'cpu_gelu.cc',
           _DIR / 'cpu_linear.cc', _DIR / 'cpu_adamw.cc')
HEADERS = (_DIR / 'cpu_kernels.h',)
TARGETS = ('LmAttentionForward', 'LmAttentionBackward', 'LmAttentionForwardPacked',
           'LmAttentionBackwardPacked', 'LmNormForward', 'LmNormBackward', 'LmLinearForward',
           'LmLinearWeightGrad', 'LmGeluBackward', 'LmAdamW')
_FAILURE: list[str] = []


def _cpu_id() -> str:
  try:
    info = pathlib.Path('/proc/cpuinfo').read_text()
    lines = [ln for ln in info.splitlines() if ln.startswith(('model name', 'flags'))]
    return '\n'.join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _compile() -> pathlib.Path:
  cxx = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if cxx is None:
    raise RuntimeError('no C++ compiler (install g++, or set CXX)')
  flags = ['-O3', '-march=native', '-std=c++17', '-shared', '-fPIC',
           f'-I{jax.ffi.include_dir()}']
  key = hashlib.sha256('\n'.join([*(f.read_text() for f in SOURCES + HEADERS),
                                  jaxlib.__version__, _cpu_id(), cxx,
                                  *flags]).encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get('LM_KERNEL_DIR', '~/.cache/lm/kernels')).expanduser()
  lib = cache / f'lm_cpu_kernels-{key}.so'
  if lib.exists():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: atomic
    out = pathlib.Path(tmp) / lib.name
    proc = subprocess.run([cxx, *flags, *map(str, SOURCES), '-o', str(out)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f'{cxx} failed on lm/ops/cpu_*.cc:\n{proc.stderr[-2000:]}')
    os.replace(out, lib)
  return lib


@functools.cache
def available() -> bool:
  """Builds (once per machine) and registers the kernels; False if that is impossible."""
  if os.environ.get('LM_CPU_KERNELS', '1') == '0':
    _FAILURE.append('LM_CPU_KERNELS=0')
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_compile()))
    for name in TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
    return True
  except Exception as e:  # pylint: disable=broad-except  (no compiler, read-only cache...)
    _FAILURE.append(str(e))
    logging.warning('C++ CPU kernels unavailable, using the XLA versions: %s', e)
    return False


def tuned_for_this_cpu() -> bool:
  """Whether the kernels pay off here: their register tiles are sized for AVX-512's 32
  vector registers. On an AVX2-only CPU (a 2-core AMD EPYC) they ran slower than XLA's
  ops: the dense layers 5x, attention 1.6x (docs/performance.md), so lm/ops/backend.py
  keeps XLA there. LM_CPU_KERNELS=force uses them anyway (tests of the kernels' path)."""
  return os.environ.get('LM_CPU_KERNELS') == 'force' or 'avx512f' in _cpu_id()


def unavailable_reason() -> str:
  return _FAILURE[-1] if _FAILURE else ''
