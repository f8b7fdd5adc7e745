"""Make glibc keep freed memory for the next train step (CPU backend only).

XLA:CPU allocates all of an executable's temporaries as one buffer per run (the compiled
step's `temp_size_in_bytes`: 0.66 GB for configs/shakespeare_char_gpu.py at batch 16).
glibc serves a block that large with a fresh mmap from the calling thread's arena and
unmaps it on free, so each step faults every page back in and the kernel zeroes it (about
15% of that config's step time on 2 CPU cores). With one arena, no mmap and no trimming
(`keep_freed_memory`), the block stays in the heap and is reused.

The cost is memory: the heap keeps more than one copy of the block, since two steps can
be in flight and allocations made between steps split a freed copy's space so that the
next block no longer fits in it; after the first few steps the count holds. Allocations
of other sizes than a step's, as evaluation and checkpointing make, split freed copies
too, so over a run the heap would keep adding copies: the train loop hands the heap's
free pages back after each evaluation and checkpoint (`release_free_memory`), at no cost
in wall time. Measurements: docs/performance.md ("Host memory").

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
_libc = None  # glibc, once keep_freed_memory has applied its settings


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
  applied = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  global _libc
  _libc = libc if applied else None
  return applied


def release_free_memory() -> bool:
  """Hands the kept heap's free pages back to the OS (glibc's malloc_trim, which also
  releases free chunks inside the heap); True if any were. For after an evaluation or a
  checkpoint: the next steps fault their temporaries in again (~0.2 s a copy on the larger
  model), and copies the heap would otherwise keep stop counting as resident. A no-op (False)
  unless keep_freed_memory applied its settings in this process."""
  return bool(_libc.malloc_trim(0)) if _libc is not None else False
