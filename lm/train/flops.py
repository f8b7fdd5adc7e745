"""Model FLOPs per token and the device's peak, for MFU.

FLOPs per trained token (PaLM, appendix B): 6 * N + 12 * L * D_attn * T, where N counts
the parameters that take part in matmuls (every weight except the position table, and
except the input embedding when the head is untied: a lookup is not a matmul), L the
layers, D_attn = n_heads * head_dim and T the context length. This is nanoGPT's
estimate_mfu formula too, so the figures compare.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp

from lm import models
from lm.ops import backend

# Dense bf16 matmul peaks from the spec sheets, in FLOP/s per device.
SPEC_PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
    'TPU v5': 459e12,  # v5p's device_kind; after 'TPU v5 lite' so that v5e matches first
}


# Tables that are looked up, never multiplied: positions, token types, T5's relative biases.
LOOKUP_TABLES = ('pos_embed', 'type_embed', 'relative_bias')


def matmul_params(model, stack: str | None = None) -> int:
  """Parameters that take part in matmuls; stack: only those under 'encoder' or 'decoder'
  (an encoder-decoder's), the head counted with the decoder."""
  n = 0
  for path, _, size in models.param_table(model):
    parts = path.split('/')
    if any(p in LOOKUP_TABLES for p in parts) or (
        parts[0] == 'embed' and not getattr(model.cfg, 'tie_embeddings', True)):
      continue
    if stack is not None and (parts[0] == 'encoder') != (stack == 'encoder'):
      continue
    n += size
  return n


def flops_per_token(model, seq_len: int | None = None) -> float:
  """6N + 12 L D_attn T per trained token. An encoder-decoder counts per encoder token,
  with the decoder's share scaled by max_target_len / max_len (its tokens per encoder
  token): 6 N_enc + 12 L_enc D S + (T/S) (6 N_dec + 12 L_dec D (T + S))."""
  cfg = model.cfg
  t = seq_len or cfg.max_len
  width = cfg.n_heads * cfg.head_dim_
  if getattr(cfg, 'family', 'decoder') == 'encdec':
    ratio = cfg.max_target_len / t
    enc = 6.0 * matmul_params(model, 'encoder') + 12.0 * cfg.n_layers * width * t
    dec = (6.0 * matmul_params(model, 'decoder')
           + 12.0 * cfg.n_decoder_layers_ * width * (cfg.max_target_len + t))
    return enc + ratio * dec
  return 6.0 * matmul_params(model) + 12.0 * cfg.n_layers * width * t


def speed_report(tokens_per_sec: float, flops_per_token: float, peak: float) -> dict:
  """The last line of scripts/benchmark*.py (the benchmark contract in docs/architecture.md)."""
  return {'tokens_per_sec': tokens_per_sec, 'model_flops_per_token': flops_per_token,
          'model_flops_per_sec': tokens_per_sec * flops_per_token, 'peak_flops_per_sec': peak,
          'mfu': tokens_per_sec * flops_per_token / peak}


ONEDNN_OPTIONS = backend.ONEDNN_OPTIONS  # runtime.cpu_matmuls='onednn'

# XLA:CPU hands a oneDNN thunk's runtime back to its pool in a callback that can run after
# the result is ready; freeing the executable inside that window aborts the process
# ("Check failed: available_.size() == num_created_", object_pool.h; seen under load in
# CI). So a function compiled with oneDNN is kept, with its executables, for the process.
_ONEDNN_FUNCTIONS = []


def jit(fun, compiler_options: dict | None = None, **kwargs):
  """jax.jit that keeps functions compiled for oneDNN alive (see _ONEDNN_FUNCTIONS)."""
  f = jax.jit(fun, compiler_options=compiler_options, **kwargs)
  if compiler_options and compiler_options.get('xla_cpu_use_onednn'):
    _ONEDNN_FUNCTIONS.append(f)
  return f


@functools.cache
def _matmul(onednn: bool):
  return jit(jnp.matmul, compiler_options=ONEDNN_OPTIONS if onednn else None)


def measure_matmul_peak(n: int = 2048, repeats: int = 10, dtype=jnp.float32,
                        onednn: bool = False) -> float:
  """Best-of-`repeats` FLOP/s of an n x n dense matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = _matmul(onednn)
  f(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops_per_sec(device=None) -> tuple[float, str]:
  """(peak, how): the spec sheet on GPU/TPU; on CPU a timed float32 matmul, the faster of
  XLA:CPU's YNNPACK and oneDNN. Timed once per process and device kind (seconds on CPU).
  The environment variable LM_PEAK_FLOPS (FLOP/s a device) overrides both: hardware the
  table lacks, or runs whose MFU nobody reads (the tests' scripts) skip the timing."""
  if os.environ.get('LM_PEAK_FLOPS'):
    try:
      return float(os.environ['LM_PEAK_FLOPS']), 'LM_PEAK_FLOPS'
    except ValueError:
      raise ValueError(f'LM_PEAK_FLOPS={os.environ["LM_PEAK_FLOPS"]!r} is not a number; set '
                       'it to the peak FLOP/s of one device (e.g. 1e12) or unset it.') from None
  device = device or jax.devices()[0]
  return _peak(device.platform, device.device_kind, device)


@functools.lru_cache(maxsize=None)
def _peak(platform: str, kind: str, device) -> tuple[float, str]:
  del platform, kind  # the cache key: devices of one kind share a peak
  if device.platform != 'cpu':
    kind = device.device_kind
    for name, peak in SPEC_PEAK_FLOPS.items():
      if name.lower() in kind.lower():
        return peak, f'spec sheet ({name})'
    return measure_matmul_peak(8192, dtype=jnp.bfloat16), f'timed bf16 matmul ({kind})'
  # The faster of XLA:CPU's two matmul libraries (oneDNN's is ~10% above YNNPACK's here):
  # a config may run its step on either (runtime.cpu_matmuls), so MFU is against the best.
  try:
    onednn = measure_matmul_peak(onednn=True)
  except Exception:  # pylint: disable=broad-except  (a jaxlib built without the option)
    onednn = 0.0
  peak = max(measure_matmul_peak(), onednn)
  return peak, 'timed float32 matmul, best of YNNPACK and oneDNN (cpu)'


def mesh_peak_flops_per_sec(mesh) -> tuple[float, str]:
  """(peak, how) of all the mesh's devices together.

  CPU devices of one process (--xla_force_host_platform_device_count) share its cores,
  and the timed matmul already uses them all: count each process once, not each device.
  """
  devices = list(mesh.devices.flat)
  peak, how = peak_flops_per_sec(devices[0])
  if devices[0].platform == 'cpu':
    return peak * len({d.process_index for d in devices}), how
  return peak * len(devices), how
