"""Ahead-of-time compiles of the real train step for Cloud TPU topologies, on any host.

libtpu describes a TPU slice without the hardware (jax.experimental.topologies); the train
step is built over those devices (trainer.build(config, devices=...)) and compiled by the
TPU compiler here, on a CPU machine. Every figure in the report is the TPU compiler's own
estimate (memory_analysis, cost_analysis), never a measurement:

  python scripts/train.py --config=configs/llama2_7b.py --compile_only --topology=v5p-32

Cloud TPU names. v4-N and v5p-N count TensorCores (2 per chip): v5p-8 is 4 chips (2x2x1),
v5p-32 16 chips (2x2x4). v5e-N (v5litepod-N) and v6e-N count chips: v5e-8 is 8 chips
(2x4). JAX runs one device per chip on all four (v4 and v5p as "megacore"), so the mesh
has N/2 devices on v4/v5p and N on v5e/v6e. libtpu's own spelling ('v5p:2x2x4') works too.

The time estimate. cost_analysis()['optimal_seconds'] sums a cost per HLO op and charges -1
for each op it knows no cost for. A real TPU step always has some: memory-space assignment's
sliced prefetches end in `ConcatBitcast` custom calls (their slices joined in place), 25 in
a one-layer GPT-2 step and 677 in a gpt2_124m step on v5e-8, whose optimal_seconds was
-676.87; multislice adds `SliceId` and `ZeroCrop`. So it comes back negative with no loop at
all. Each such op (UNCOSTED_CUSTOM_CALLS) is counted in the compiled HLO and its -1 added
back, i.e. it is taken as free (one-layer GPT-2: -24.9948 + 25 = 0.0052 s; compiled with
sliced prefetch off, xla_tpu_sliced_prefetch_max_slices=0, the step is costed 0.0053 s).

A while loop is costed once, not per trip, so its FLOPs and seconds are short by the trip
count: ours (scanned layers, microbatches) and the SPMD partitioner's (with FSDP over 16
chips it windows a weight's all-gather into its matmul: `windowed_dot_general` loops, five
a layer in llama2_7b on v5p-32). A step with loops is therefore estimated from loop-free
variants (runtime.scan_layers False, train.microbatches 1) compiled with ESTIMATE_OPTIONS
(windowed einsums off: each collective whole, beside its matmul; the estimate models that
schedule, not the windowed one). By default the variants have 1 and 2 layers, extrapolated
linearly to all (costs add up over ops, and each layer is the same ops): that compiles in a
fraction of the time of the whole unrolled step, and fits where it may not (llama2_7b at
batch 16 x 4096 on v5p-8 with XLA attention and remat: 194 GiB of temporaries a chip
unrolled, 58 GiB in all scanned). Memory and `fits` always come from the program as
configured. A figure still not positive, or from a program with loops left, is None.

Mosaic (Pallas TPU) kernels, such as splash attention, are `tpu_custom_call`s that the cost
model counts as zero FLOPs and times by their operand bytes only (a splash forward at
T=4096 is costed 4x its T=1024 time, for 16x the work): with splash, the compiler's FLOPs
leave attention out and the step time is short by most of attention's. The report counts
them (`costed_by_bytes_only`); what they leave out is at most the attention share of the
model FLOPs (`attention_flops_share`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

from lm import models
from lm import peft as peft_lib
from lm.train import flops as flops_lib
from lm.train import trainer

GIB = 2 ** 30

# Custom calls that cost_analysis charges -1 s each ("no cost known"): memory-space
# assignment's ConcatBitcast (the slices of a sliced prefetch, joined in place) and
# multislice's SliceId and ZeroCrop. Counted in the HLO and added back (module docstring).
UNCOSTED_CUSTOM_CALLS = ('ConcatBitcast', 'SliceId', 'ZeroCrop')

# TPU compiler options for the loop-free variants: all-gathers and reduce-scatters beside
# their matmuls, not windowed into them (SPMD's while loops, costed once).
ESTIMATE_OPTIONS = {'xla_tpu_enable_windowed_einsum_for_all_gather': False,
                    'xla_tpu_enable_windowed_einsum_for_reduce_scatter': False}


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as Cloud TPU names it and libtpu describes it."""
  name: str  # Cloud TPU's: 'v5p'
  libtpu: str  # libtpu's topology prefix: 'v5p' in 'v5p:2x2x1'
  dims: int  # 3: a 3D torus of 4-chip hosts (2x2x1); 2: a 2D one
  cores_in_name: bool  # the number in 'v5p-32' counts TensorCores (2 per chip), not chips
  chip_config: str  # 'megacore': one JAX device per chip (as on a Cloud v4 VM)
  hbm_bytes: int  # per chip, spec sheet
  peak_key: str  # key of flops.SPEC_PEAK_FLOPS: dense bf16 FLOP/s per chip


GENERATIONS = {
    'v4': Generation('v4', 'v4', 3, True, 'megacore', 32 * GIB, 'TPU v4'),
    'v5p': Generation('v5p', 'v5p', 3, True, 'default', 95 * GIB, 'TPU v5p'),
    'v5e': Generation('v5e', 'v5e', 2, False, 'default', 16 * GIB, 'TPU v5e'),
    'v6e': Generation('v6e', 'v6e', 2, False, 'default', 32 * GIB, 'TPU v6e'),
}
ALIASES = {'v5litepod': 'v5e'}

# Slice shapes per chip count (Cloud TPU's default topologies).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


def _shapes_3d(max_chips: int = 4096) -> dict[int, tuple[int, int, int]]:
  """2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...: each doubles its last smallest side."""
  shapes, shape = {}, [2, 2, 1]
  while math.prod(shape) <= max_chips:
    shapes[math.prod(shape)] = tuple(shape)
    i = max(j for j in range(3) if shape[j] == min(shape))
    shape[i] *= 2
  return shapes


_SHAPES_3D = _shapes_3d()


def known_topologies() -> list[str]:
  names = []
  for gen in GENERATIONS.values():
    shapes = _SHAPES_3D if gen.dims == 3 else _SHAPES_2D
    names += [f'{gen.name}-{chips * (2 if gen.cores_in_name else 1)}' for chips in shapes]
  return names


def parse_topology(name: str) -> tuple[Generation, tuple[int, ...]]:
  """'v5p-32' (or libtpu's 'v5p:2x2x4') -> (generation, chip grid)."""
  m = re.fullmatch(r'(v\d+[a-z]*)[-:]([\dx]+)', name.strip().lower())
  gen = GENERATIONS.get(ALIASES.get(m.group(1), m.group(1))) if m else None
  shape = None
  if gen is not None and 'x' in m.group(2):  # libtpu's spelling
    shape = tuple(int(s) for s in m.group(2).split('x') if s)
    shape = shape if len(shape) == gen.dims and all(shape) else None
  elif gen is not None and name.count(':') == 0:
    n = int(m.group(2))
    if not gen.cores_in_name or n % 2 == 0:
      chips = n // 2 if gen.cores_in_name else n
      shape = (_SHAPES_3D if gen.dims == 3 else _SHAPES_2D).get(chips)
  if shape is None:
    raise ValueError(
        f'Unknown TPU topology {name!r}. Known: {", ".join(known_topologies())} (v4/v5p count '
        'TensorCores, 2 per chip; v5e/v6e count chips), or libtpu\'s spelling such as '
        "'v5p:2x2x4' or 'v5e:2x4'.")
  return gen, shape


def _host_bounds(gen: Generation, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """Chips per host: 4 (2x2x1) on v4/v5p and on multi-host v5e/v6e; up to 8 on one host."""
  if gen.dims == 2 and math.prod(shape) <= 8:
    return (shape[0], shape[1], 1)
  return (2, 2, 1)


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of a Cloud TPU slice (or num_slices of them), for compiling only.

  'v5p-8' -> 4 devices (2x2x1 chips), 'v5p-32' -> 16, 'v5e-8' -> 8 (2x4), 'v4-8' -> 4,
  'v6e-8' -> 8; num_slices > 1: that many slices joined over DCN (multislice).
  Needs libtpu (the `tpu` extra: pip install -e '.[tpu]'); the host needs no TPU.
  """
  gen, shape = parse_topology(name)
  if num_slices < 1:
    raise ValueError(f'num_slices must be >= 1, got {num_slices}.')
  from jaxlib import xla_client
  from jax.experimental import topologies
  if not (xla_client.pjrt_plugin_loaded('tpu') and xla_client.pjrt_plugin_initialized('tpu')):
    # libtpu takes /tmp/libtpu_lockfile when it starts, so a second compile (or any JAX
    # process that probed for a TPU) would fail to start it. A topology touches no chip.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    topo = topologies.get_topology_desc(
        platform='tpu', topology_name=f'{gen.libtpu}:{"x".join(map(str, shape))}',
        chip_config_name=gen.chip_config, chips_per_host_bounds=_host_bounds(gen, shape),
        num_slices=num_slices)
  except RuntimeError as e:
    if 'not installed' in str(e):
      raise RuntimeError('Compiling for a TPU topology needs libtpu: pip install -e ".[tpu]" '
                         '(or pip install "jax[tpu]").') from e
    raise
  return list(topo.devices)


def _runtime(config):
  """The section that holds dtype/remat/scan_layers/attention (runtime; model before)."""
  return config.runtime if 'runtime' in config else config.model


def loop_free(config, n_layers: int | None = None):
  """The config with no loops of ours in its step: layers unrolled, one microbatch
  (n_layers: also that many layers)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    _runtime(config).scan_layers = False
    config.train.microbatches = 1
    config.train.steps_per_call = 1
    if n_layers is not None:
      config.model.n_layers = n_layers
  return config


def _count(pattern: str, hlo: str) -> int:
  return len(re.findall(pattern, hlo))


def hlo_facts(hlo: str) -> dict:
  """What in a compiled module's text bears on the estimates (counts of ops)."""
  targets = re.findall(r'custom_call_target="([^"]*)"', hlo)
  return {'while_loops': _count(r'\swhile\(', hlo),
          'uncosted_ops': sum(t in UNCOSTED_CUSTOM_CALLS for t in targets),
          'tpu_custom_calls': targets.count('tpu_custom_call')}


def _memory(compiled) -> dict:
  mem = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'alias_size_in_bytes', 'generated_code_size_in_bytes')
  out = {f: int(getattr(mem, f, 0) or 0) for f in fields}
  # The donated state aliases its output: arguments + temporaries + any new outputs.
  out['total'] = (out['argument_size_in_bytes'] + out['temp_size_in_bytes']
                  + out['output_size_in_bytes'] - out['alias_size_in_bytes'])
  return out


def _out_of_memory(error: Exception) -> dict | None:
  """The compiler's figures from its RESOURCE_EXHAUSTED error (None: another error)."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text and 'Ran out of memory' not in text:
    return None
  size = lambda s: float(s[:-1]) * {'K': 2 ** 10, 'M': 2 ** 20, 'G': GIB, 'T': 2 ** 40}[s[-1]]
  need = re.search(r'required[^(]*\((\d+(?:\.\d+)?[KMGT])\)', text) or re.search(
      r'Used (\d+(?:\.\d+)?[KMGT])', text)
  have = re.search(r'available HBM \((\d+(?:\.\d+)?[KMGT])\)', text) or re.search(
      r'of (\d+(?:\.\d+)?[KMGT]) hbm', text)
  return {'required': int(size(need.group(1))) if need else None,
          'available': int(size(have.group(1))) if have else None,
          'message': text.strip().splitlines()[0][:500]}


def _cost(compiled) -> tuple[dict, dict]:
  """(FLOPs and seconds, hlo facts) of a compiled step, each uncosted op's -1 s added back."""
  cost = compiled.cost_analysis()
  cost = dict((cost[0] if isinstance(cost, (list, tuple)) else cost) or {})  # older JAX: a list
  facts = hlo_facts(compiled.as_text())
  seconds = cost.get('optimal_seconds')
  return {'flops': cost.get('flops'),
          'seconds': None if seconds is None else seconds + facts['uncosted_ops']}, facts


def _compile_variant(config, devices, n_layers: int | None) -> tuple[dict, dict]:
  """_cost of loop_free(config, n_layers), compiled with ESTIMATE_OPTIONS."""
  setup = trainer.build(loop_free(config, n_layers), devices=devices)
  return _cost(setup.train_step.lower(setup.abstract_state, trainer.abstract_batch(
      setup)).compile(compiler_options=ESTIMATE_OPTIONS))


def _estimate(config, devices, how: str) -> tuple[dict, dict, str]:
  """(cost, hlo facts, how) of the step's loop-free variants (see compile_report)."""
  layers = config.model.n_layers
  if how == 'full' or layers <= 2:
    cost, facts = _compile_variant(config, devices, None)
    return cost, facts, 'loop-free variant (scan_layers=False, microbatches=1), ESTIMATE_OPTIONS'
  # Costs add up over ops and every layer is the same ops: cost(L) = cost(1) + (L - 1) *
  # (cost(2) - cost(1)). Two small compiles, where the whole unrolled step can take many
  # times longer to compile and need more HBM than the scanned one (docs/tpu_compile.md
  # compares the two).
  (c1, f1), (c2, f2) = (_compile_variant(config, devices, n) for n in (1, 2))
  cost = {k: None if c1[k] is None or c2[k] is None else c1[k] + (layers - 1) * (c2[k] - c1[k])
          for k in c1}
  facts = {k: f1[k] + (layers - 1) * (f2[k] - f1[k]) for k in f1}
  return cost, facts, (f'loop-free variants with 1 and 2 layers (scan_layers=False, '
                       f'microbatches=1, ESTIMATE_OPTIONS), extrapolated linearly to {layers} '
                       'layers')


def compile_report(config, topology: str, num_slices: int = 1,
                   estimate: str = 'layers') -> dict:
  """Compiles the train step for a TPU topology here; the compiler's memory and cost figures.

  config: resolved (model.vocab_size set). The memory figures and `fits` are those of the
  step as configured, and so are the FLOPs and time when it has no while loop. A step with
  loops is estimated from loop-free variants (module docstring) per `estimate`: 'layers'
  (default): the step with 1 and 2 layers unrolled, extrapolated to all layers; 'full':
  all layers unrolled (slow to compile, and it may not fit where the scanned step does:
  then the estimates are None, with `estimate_error`); 'none': estimates None.
  Per-device fields are per TPU chip (one JAX device per chip).
  """
  if estimate not in ('layers', 'full', 'none'):
    raise ValueError(f"estimate must be 'layers', 'full' or 'none', got {estimate!r}.")

  gen, _ = parse_topology(topology)
  devices = topology_devices(topology, num_slices)
  peak_per_chip = flops_lib.SPEC_PEAK_FLOPS[gen.peak_key]
  start = time.perf_counter()
  setup = trainer.build(config, devices=devices)
  tokens_per_step = config.train.batch_size * config.model.max_len
  flops_per_token = flops_lib.flops_per_token(setup.model)
  model_flops = flops_per_token * tokens_per_step
  cfg = setup.model.cfg  # attention's term of flops_per_token (12 L N H T)
  attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim_ * config.model.max_len
  report: dict[str, Any] = {
      'figures': 'TPU compiler estimates (libtpu, ahead of time), not measurements',
      'topology': topology, 'num_slices': num_slices, 'devices': len(devices),
      'device_kind': devices[0].device_kind, 'mesh': dict(setup.mesh.shape),
      'batch_size': config.train.batch_size, 'seq_len': config.model.max_len,
      'num_params': models.count_params(trainer.full_params(setup.abstract_state)),
      'trainable_params': models.count_params(setup.abstract_state['params']),
      'peft': config.peft.method,
      'frozen_bytes': peft_lib.nbytes(setup.abstract_state.get('frozen', {})),
      'dtype': _runtime(config).dtype, 'remat': _runtime(config).remat,
      'scan_layers': bool(_runtime(config).scan_layers),
      'microbatches': config.train.microbatches,
      'attention': getattr(getattr(setup, 'kernels', None), 'attention', None),
      'hbm_capacity_bytes': gen.hbm_bytes,
  }
  lowered = setup.train_step.lower(setup.abstract_state, trainer.abstract_batch(setup))
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = _out_of_memory(e)
    if oom is None:
      raise
    report.update(hbm_bytes_per_device=oom['required'], fits=False, compile_error=oom['message'],
                  compiler_hbm_available_bytes=oom['available'],
                  model_flops_per_step=model_flops, compiler_flops_per_step=None,
                  compiler_flops_per_device=None, estimated_step_seconds=None,
                  estimated_mfu=None, compile_seconds=round(time.perf_counter() - start, 1))
    return report
  memory = _memory(compiled)
  cost, facts = _cost(compiled)
  del compiled
  report.update(hbm_bytes_per_device=memory['total'],
                hbm_gib_per_device=round(memory['total'] / GIB, 3),
                fits=memory['total'] <= gen.hbm_bytes, memory=memory, **facts,
                splash_attention=facts['tpu_custom_calls'] > 0)

  # The estimate: this program's when it has no while loop, else the loop-free variants'.
  est_facts, how, error = facts, 'the program as configured', None
  if facts['while_loops']:
    cost, how = None, None
    if estimate != 'none':
      try:
        cost, est_facts, how = _estimate(config, devices, estimate)
      except Exception as e:  # pylint: disable=broad-except
        if _out_of_memory(e) is None:
          raise
        error = _out_of_memory(e)['message']
  flops = seconds = None
  if cost is not None and not est_facts['while_loops']:
    ok = lambda x, low: x is not None and x > low  # noqa: E731
    flops = float(cost['flops']) if ok(cost['flops'], 0) else None
    seconds = float(cost['seconds']) if ok(cost['seconds'], 0) else None
  chips = len(devices)
  report.update(
      model_flops_per_step=model_flops,
      # cost_analysis counts one device's program (SPMD: every device runs it).
      compiler_flops_per_device=flops,
      compiler_flops_per_step=flops * chips if flops is not None else None,
      compiler_to_model_flops=round(flops * chips / model_flops, 3) if flops else None,
      estimated_step_seconds=seconds,
      peak_flops_per_sec=peak_per_chip * chips,
      estimated_mfu=(model_flops / (seconds * peak_per_chip * chips)) if seconds else None,
      estimate_from=how, estimate_while_loops=est_facts['while_loops'],
      **({'estimate_error': error} if error else {}),
      estimate_uncosted_ops=est_facts['uncosted_ops'],
      costed_by_bytes_only=est_facts['tpu_custom_calls'],
      attention_flops_share=round(attention / flops_per_token, 4),
      compile_seconds=round(time.perf_counter() - start, 1))
  return report
