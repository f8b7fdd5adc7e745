"""Make glibc keep freed memory for the next train step (CPU backend only).

XLA:CPU allocates all of an executable's temporaries as one buffer per run: 1.2 GB for
shakespeare_char_gpu at batch 16, 45 MB for shakespeare_char. glibc serves a block that
large with a fresh mmap from the calling thread's arena and unmaps it on free, so each
step faults every page back in and the kernel zeroes it: ~290k page faults and ~0.6 s of
system time per step on the larger model. With one arena, no mmap and no trimming, the
block stays in the heap and is reused. Measured on 2 cores, one session: 1.41x tokens/s
on shakespeare_char, 1.14x on shakespeare_char_gpu. The cost is memory: freed blocks stay
resident and two steps in flight can each hold one, so the larger model's peak RSS rose
from 2.0 GB to 3.1-5.3 GB (varying run to run with allocation timing), 5.7 GB with
oneDNN matmuls, whose own allocations fragment the kept heap (README).
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
