"""The kernel seam: every backend- and device-specific choice, made once per run.

`select(runtime, mesh)` looks at the run's mesh (its devices' platform and count) and the
runtime config, and returns a frozen `Kernels` that is handed to the model (inside its
config) and to the optimizer. Models never ask how many devices there are or which
backend is the default: compiling for a TPU topology on a CPU host gets TPU choices.

The default `Kernels()` is pure XLA with no C++ and no Pallas: what shape-only tracing
(`jax.eval_shape` in model_summary, HF shapes) and hand-built models use, so they never
invoke a compiler.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lm.ops import cpu_kernels

ATTENTION = ('auto', 'xla', 'splash', 'cudnn', 'cpu')

# XLA:CPU options that send every dot to oneDNN instead of YNNPACK (runtime.cpu_matmuls).
ONEDNN_OPTIONS = {'xla_cpu_use_onednn': True,
                  'xla_cpu_experimental_onednn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


@dataclasses.dataclass(frozen=True)
class Kernels:
  """What the model and optimizer run on this backend (hashable: it sits in Linen configs).

  attention: resolved implementation: 'xla' (lm/ops/attention.py on CPU; on accelerators
    the memory-lean path when remat is on), 'splash' (TPU Pallas), 'cudnn' (GPU flash),
    'cpu' (the C++ kernel); each falls back to 'xla' where its kernel does not apply.
  cpu_ops: the C++ norms, dense layers and GELU (one CPU device with AVX-512, built).
  fused_qkv: q, k, v as one matmul against the three kernels side by side (one CPU
    device; never with adapters or quantized weights, which need each projection).
  fused_adamw: AdamW as one C++ op (lm/ops/cpu_adamw.py).
  platform: 'cpu', 'gpu' or 'tpu', of the mesh's devices.
  mesh: the run's mesh, for kernels that must be wrapped in shard_map (splash).
  adapters: lm.peft.Adapters (LoRA, QLoRA, prompt or prefix tuning) or None.
  quant: lm.compress.quantize.Quant (post-training quantized kernels) or None.
  """
  attention: str = 'xla'
  cpu_ops: bool = False
  fused_qkv: bool = False
  fused_adamw: bool = False
  platform: str = 'cpu'
  mesh: Any = None
  adapters: Any = None
  quant: Any = None


def select(runtime, mesh, *, adapters=None, quant=None) -> Kernels:
  """The run's choices from its runtime config and mesh (see Kernels).

  adapters: lm.peft.Adapters or None. LoRA deltas and NF4 weights hook into each
  projection (Linear), so kernels that fuse several projections are off; prompt and prefix
  tuning add keys every example attends to, so attention takes the masked XLA path.
  """
  if runtime.attention not in ATTENTION:
    raise ValueError(f"runtime.attention must be one of {', '.join(ATTENTION)}; got "
                     f"{runtime.attention!r}.")
  if runtime.cpu_matmuls not in ('ynn', 'onednn'):
    raise ValueError(f"runtime.cpu_matmuls must be 'ynn' or 'onednn', got "
                     f"{runtime.cpu_matmuls!r}")
  platform = mesh.devices.flat[0].platform
  platform = 'gpu' if platform in ('cuda', 'rocm') else platform
  one_cpu = platform == 'cpu' and mesh.devices.size == 1
  # Builds the kernels here, once per machine; only where they beat XLA (AVX-512).
  cpp = one_cpu and cpu_kernels.tuned_for_this_cpu() and cpu_kernels.available()
  attention = runtime.attention
  if attention == 'auto':
    sixteen_bit = runtime.dtype in ('bfloat16', 'float16')
    attention = {'tpu': 'splash', 'gpu': 'cudnn' if sixteen_bit else 'xla'}.get(
        platform, 'cpu' if cpp else 'xla')
  elif (attention == 'cpu' and not cpp) or (attention == 'splash' and platform != 'tpu') or (
      attention == 'cudnn' and platform != 'gpu'):
    attention = 'xla'  # asked for a kernel this backend does not have
  if adapters is not None and adapters.num_prefix and attention in ('cpu', 'splash'):
    attention = 'xla'
  return Kernels(attention=attention, cpu_ops=cpp,
                 fused_qkv=one_cpu and adapters is None and quant is None,
                 fused_adamw=cpp, platform=platform, mesh=None if one_cpu else mesh,
                 adapters=adapters, quant=quant)


def compiler_options(runtime, kernels: Kernels) -> dict | None:
  """XLA options for the steps: runtime.cpu_matmuls='onednn' sends XLA:CPU's dots to oneDNN.

  XLA:CPU's default library (YNNPACK) runs each batched matmul of attention (B*N small
  products) on one thread; oneDNN spreads them over the cores, which pays off with XLA's
  attention on larger models; with the C++ attention kernel YNNPACK is as fast or faster
  (docs/performance.md). The option is marked experimental in XLA, so it stays opt-in per
  config. Ignored off CPU.
  """
  if runtime.cpu_matmuls != 'onednn' or kernels.platform != 'cpu':
    return None
  return ONEDNN_OPTIONS
