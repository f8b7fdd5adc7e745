"""lm/train/host_memory: glibc keeps a freed large block for the next step, and hands the
kept heap's free pages back when asked."""
import os
import subprocess
import sys

import pytest

_SETUP = '''
import ctypes, os, resource, sys
from lm.train import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
'''

_PROBE = _SETUP + '''
def faults_of_a_fresh_64mb_block():  # as XLA's temporaries: malloc, touch every page, free
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  libc.free(block)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_64mb_block()
print(applied, faults_of_a_fresh_64mb_block())
'''


_RELEASE_PROBE = _SETUP + '''
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
pin = libc.malloc(4096)  # above the block: freed, it is a hole inside the heap, not its top
libc.free(block)
kept = rss()
released = host_memory.release_free_memory()
print(applied, released, (kept - rss()) >> 20)
'''


def probe(mode, code=_PROBE, **overrides):
  env = {k: v for k, v in os.environ.items() if k not in ('LM_SYSTEM_MALLOC', 'JAX_PLATFORMS')
         } | {'JAX_PLATFORMS': 'cpu'} | overrides
  out = subprocess.run([sys.executable, '-c', code, mode], env=env, capture_output=True,
                       text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  return [v == 'True' if v in ('True', 'False') else int(v) for v in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning')
def test_second_large_block_reuses_memory():
  applied, faults = probe('keep')
  assert applied
  assert faults < 1000, faults  # 64 MB is 16k pages: reused, not faulted in again
  applied, faults = probe('system')
  assert not applied and faults > 10000, faults  # glibc default: a fresh mmap each time


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning')
def test_release_hands_a_kept_block_back():
  applied, released, freed_mb = probe('keep', _RELEASE_PROBE)
  assert applied and released
  assert freed_mb >= 60, freed_mb  # the 64 MB hole is no longer resident
  assert probe('system', _RELEASE_PROBE)[:2] == [False, False]  # a no-op: malloc untouched


def test_opt_out_and_accelerators_leave_malloc_alone():
  assert probe('keep', LM_SYSTEM_MALLOC='1')[0] is False
  assert probe('keep', JAX_PLATFORMS='tpu')[0] is False
