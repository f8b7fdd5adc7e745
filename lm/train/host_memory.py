"""Make glibc keep freed memory for the next train step (CPU backend only).

XLA:CPU allocates all of an executable's temporaries as one buffer per run: 0.66 GB for
shakespeare_char_gpu at batch 16, 28 MB for shakespeare_char (`temp_size_in_bytes` of the
compiled step). glibc serves a block that large with a fresh mmap from the calling
thread's arena and unmaps it on free, so each step faults every page back in and the
kernel zeroes it: ~180k page faults per step on the larger model, 1.31 s a step against
1.10-1.15 s here (2026-12-02). With one arena, no mmap and no trimming, the block stays in
the heap and is reused. The cost is memory: the heap keeps more than one copy of the
block, since two steps can be in flight and allocations made between steps split a freed
copy's space so that the next block no longer fits in it. On the larger model (mallinfo2,
2026-12-02) the heap held 0.26 GB of longer-lived data plus two to five copies of the
block after its first 5-15 steps, then stayed put: peak RSS 1.84-3.77 GB against 1.29 GB
with glibc's defaults; more with oneDNN matmuls, whose own allocations fragment the kept
heap (README).
LM_SYSTEM_MALLOC=1 turns it off.
Must run before JAX starts its threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'libtpu')


def keep_freed_memory() -> bool:
  """Tunes glibc malloc as above; True if applied. A no-op (False) off glibc/Linux,
  under LM_SYSTEM_MALLOC=1, or when JAX will run on an accelerator (JAX_PLATFORMS
  without cpu, or a GPU/TPU plugin installed and JAX_PLATFORMS not 'cpu'): there the
  temporaries are not host memory."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  accelerator = any(importlib.util.find_spec(m) for m in _ACCELERATOR_PLUGINS)
  if (not sys.platform.startswith('linux') or os.environ.get('LM_SYSTEM_MALLOC') == '1'
      or (platforms and 'cpu' not in platforms.split(','))
      or (accelerator and platforms != 'cpu')):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  # Order matters: one arena first, so XLA's threads allocate from the main heap (other
  # arenas mmap anything over 64 MB); -1 is SIZE_MAX: never give the heap top back.
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
