"""The fused CPU attention kernel (cpu_attention.cc): build, load, call, differentiate.

The C++ source is compiled on first use with the system's C++ compiler for this machine
(-march=native) against the XLA FFI headers that ship in jaxlib, and cached under
~/.cache/lm/kernels keyed by the source, jaxlib's version and the CPU; set LM_KERNEL_DIR to
move the cache. Without a compiler `available()` is False (with the reason in
`unavailable_reason()`) and lm.models.layers uses lm/ops/attention.py instead.
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
import jax.numpy as jnp
import jaxlib
import numpy as np

Array = jax.Array
SOURCE = pathlib.Path(__file__).with_name('cpu_attention.cc')
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
  key = hashlib.sha256('\n'.join([SOURCE.read_text(), jaxlib.__version__, _cpu_id(), cxx,
                                  *flags]).encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get('LM_KERNEL_DIR', '~/.cache/lm/kernels')).expanduser()
  lib = cache / f'cpu_attention-{key}.so'
  if lib.exists():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: atomic
    out = pathlib.Path(tmp) / lib.name
    proc = subprocess.run([cxx, *flags, str(SOURCE), '-o', str(out)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f'{cxx} failed on {SOURCE.name}:\n{proc.stderr[-2000:]}')
    os.replace(out, lib)
  return lib


@functools.cache
def available() -> bool:
  """Builds (once per machine) and registers the kernel; False if that is impossible."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(_compile()))
    for name in ('LmAttentionForward', 'LmAttentionBackward'):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
    return True
  except Exception as e:  # pylint: disable=broad-except  (no compiler, read-only cache...)
    _FAILURE.append(str(e))
    logging.warning('CPU attention kernel unavailable, using the XLA attention: %s', e)
    return False


def unavailable_reason() -> str:
  return _FAILURE[-1] if _FAILURE else ''


def supports(q_BTNH: Array, k_BSKH: Array) -> bool:
  """Shapes and dtypes the kernel takes (else the caller uses the XLA attention)."""
  _, t, n, h = q_BTNH.shape
  return (q_BTNH.dtype == k_BSKH.dtype == jnp.float32 and k_BSKH.shape[1] == t
          and n % k_BSKH.shape[2] == 0 and h % 16 == 0 and t % 16 == 0
          and t <= 4096)  # a thread holds two [T, T] float32 score blocks


def _call(name, results, *args, causal, rate):
  return jax.ffi.ffi_call(name, results)(*args, causal=causal, rate=np.float32(rate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, seg_BT: Array, seed: Array,
              causal: bool = True, rate: float = 0.0) -> Array:
  """softmax(q k^T / sqrt(H) masked) v; a query sees keys of its own segment (and not
  after it if causal); dropout `rate` on the probabilities, hashed from `seed` uint32[2]
  exactly as lm/ops/attention.py does. q [B, T, N, H]; k, v [B, T, K, H]; seg [B, T]."""
  return _forward(q_BTNH, k_BSKH, v_BSKH, seg_BT, seed, causal, rate)[0]


def _forward(q, k, v, seg, seed, causal, rate):
  b, t, n, _ = q.shape
  return _call('LmAttentionForward',
               (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t),
                                                                             jnp.float32)),
               q, k, v, seg, seg, seed, causal=causal, rate=rate)


def _fwd(q, k, v, seg, seed, causal, rate):
  out, lse = _forward(q, k, v, seg, seed, causal, rate)
  return out, (q, k, v, seg, seed, out, lse)


def _bwd(causal, rate, res, dout):
  q, k, v, seg, seed, out, lse = res
  dq, dk, dv = _call('LmAttentionBackward',
                     tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
                     q, k, v, seg, seg, seed, out, lse, dout, causal=causal, rate=rate)
  return dq, dk, dv, None, None


attention.defvjp(_fwd, _bwd)
