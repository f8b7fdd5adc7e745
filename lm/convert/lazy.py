"""Params that stream through Orbax one tensor at a time (conversion of big checkpoints).

Orbax's own numpy handler copies every array before writing and writes them all at
once, so saving a tree costs twice its size. A `LazyTensor` leaf instead holds a
function that makes its array; the handler below calls it when the array is due and
writes one array at a time, a few chunks per write, in the same format as a numpy
leaf, so `lm.infer.load.load_run` restores it like any other run.
Handing freed memory back to the OS after each array keeps the peak near the
libraries plus the largest tensor.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
from typing import Callable

import jax
import numpy as np
from absl import logging
import orbax.checkpoint as ocp
from orbax.checkpoint import future, type_handlers
import tensorstore as ts

from lm.train import checkpoint


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __call__(self) -> np.ndarray:
    x = self.make()
    if x.shape != tuple(self.shape) or x.dtype != self.dtype:
      raise ValueError(f'Made {x.dtype}{list(x.shape)}, expected {self.dtype}{list(self.shape)}.')
    return x


CHUNK_BYTES = 16 << 20  # zarr chunk size, and about what one write holds


def trim_memory() -> None:
  """Returns freed heap memory to the OS: glibc keeps what tensorstore's threads freed."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


class _LazyHandler(type_handlers.NumpyHandler):
  """Makes and writes the arrays one by one; the checkpoint reads back as numpy arrays."""

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)

    async def write_one_by_one():
      for value, info, arg in zip(values, infos, args):
        await self._background_serialize([value()], [info], [arg])
        trim_memory()

    return [future.CommitFutureAwaitingContractedSignals(write_one_by_one(), name='lazy_tensor')]

  async def _open_and_write(self, value, tspec, ts_context):
    # Whole chunks at a time, along the array's outermost axis in memory (the last for a
    # transposed view): written at once, the store holds a copy of the whole array.
    t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    if value.ndim == 0 or value.size == 0:
      return await t.write(value)
    axis = 0 if value.flags.c_contiguous or not value.flags.f_contiguous else value.ndim - 1
    n, step = value.shape[axis], t.chunk_layout.write_chunk.shape[axis]
    count = max(1, CHUNK_BYTES * n // max(1, value.nbytes) // step) * step
    for i in range(0, n, count):
      index = (slice(None),) * axis + (slice(i, min(i + count, n)),)
      await t[index].write(value[index])


_verbosity = logging.get_verbosity()
logging.set_verbosity(logging.ERROR)  # the registry warns that two handlers write 'np.ndarray'
type_handlers.register_type_handler(LazyTensor, _LazyHandler(), override=True)
logging.set_verbosity(_verbosity)


def save_run(workdir, lazy_params, config, tokenizer, step: int = 0) -> None:
  """What `save_inference_run` writes, with the params streamed (see the module doc)."""
  checkpoint.write_run_files(workdir, config, tokenizer)
  ckpt = checkpoint.Checkpointer(workdir, None)
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), lazy_params,
                           is_leaf=lambda x: isinstance(x, LazyTensor))
  ckpt.manager.save(step, force=True, args=ocp.args.Composite(
      params=ocp.args.PyTreeSave(lazy_params, save_args=save_args),
      config=ocp.args.JsonSave(json.loads(checkpoint.config_to_json(config)))))
  ckpt.close()


class ParamReader:
  """Restores chosen leaves of a run's params as numpy arrays, a few at a time."""

  def __init__(self, workdir, step: int | None = None):
    self.ckpt = checkpoint.Checkpointer(workdir, None, read_only=True)
    self.step = self.ckpt.latest_step() if step is None else step
    if self.step is None:
      raise FileNotFoundError(f'No checkpoint under {self.ckpt.directory}: train first '
                              '(scripts/train.py) or import one (scripts/convert_checkpoint.py).')
    self.train_state = self.ckpt.has_train_state(self.step)

  def read(self, paths: list[str]) -> dict[str, np.ndarray]:
    """{'/'-joined path: array} for the given leaves."""
    target, args = {}, {}
    for path in paths:
      *parents, leaf = path.split('/')
      t, a = target, args
      for p in parents:
        t, a = t.setdefault(p, {}), a.setdefault(p, {})
      t[leaf], a[leaf] = 0, ocp.RestoreArgs(restore_type=np.ndarray)
    item = 'state' if self.train_state else 'params'
    if self.train_state:
      target, args = {'params': target}, {'params': args}
    restore = ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True)
    out = self.ckpt.manager.restore(self.step, args=ocp.args.Composite(**{item: restore}))[item]
    out = out['params'] if self.train_state else out
    trim_memory()  # tensorstore's read buffers, before the caller's copies
    result = {}
    for path in paths:
      node = out
      for p in path.split('/'):
        node = node[p]
      result[path] = np.asarray(node)
    return result

  def close(self) -> None:
    self.ckpt.close()
