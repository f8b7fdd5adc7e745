"""safetensors read and written one tensor at a time, with plain file reads.

No mmap on purpose: pages of a mapped file count as resident memory for as long as
the mapping lives, so reading a whole checkpoint through one would cost its size.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian data.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
BLOCK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offsets in the file
  end: int


def read_header(path) -> dict[str, TensorInfo]:
  with open(path, 'rb') as f:
    n = struct.unpack('<Q', f.read(8))[0]
    header = json.loads(f.read(n))
  infos = {}
  for name, h in header.items():
    if name == '__metadata__':
      continue
    if h['dtype'] not in DTYPES:
      raise ValueError(f'{path}: tensor {name} has dtype {h["dtype"]}, which this reader '
                       f'does not know ({", ".join(DTYPES)}).')
    begin, end = h['data_offsets']
    infos[name] = TensorInfo(str(path), np.dtype(DTYPES[h['dtype']]), tuple(h['shape']),
                             8 + n + begin, 8 + n + end)
  return infos


def index_directory(directory) -> dict[str, TensorInfo]:
  """Every tensor of model.safetensors, or of the shards its index names."""
  d = pathlib.Path(directory)
  if (d / INDEX).exists():
    files = sorted(set(json.loads((d / INDEX).read_text())['weight_map'].values()))
  elif (d / SINGLE).exists():
    files = [SINGLE]
  else:
    files = sorted(p.name for p in d.glob('*.safetensors'))
  if not files:
    found = ', '.join(sorted(p.name for p in d.iterdir())[:12])
    raise FileNotFoundError(
        f'{d} holds no {SINGLE} and no {INDEX} (found: {found}). Re-save the model with '
        'transformers: model.save_pretrained(DIR) (safetensors is the default).')
  infos = {}
  for name in files:
    if not (d / name).exists():
      raise FileNotFoundError(f'{d / INDEX} names the shard {name}, which is missing.')
    infos.update(read_header(d / name))
  return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
  out = np.empty(info.shape, info.dtype)
  buf = memoryview(out.reshape(-1).view(np.uint8))
  if len(buf) != info.end - info.start:
    raise ValueError(f'{info.file}: header size of a {info.dtype}{list(info.shape)} tensor is '
                     f'{info.end - info.start} bytes, not {len(buf)}: the file is corrupt.')
  with open(info.file, 'rb') as f:
    f.seek(info.start)
    got = 0
    while got < len(buf):  # readinto may return short counts on some filesystems
      n = f.readinto(buf[got:])
      if not n:
        raise ValueError(f'{info.file} ends early: it is truncated.')
      got += n
  return out


class Writer:
  """Writes one safetensors file whose tensors (names, shapes, dtypes) are known upfront.

  The header goes first, so tensors can then be written in any order, one at a time.
  """

  def __init__(self, path, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
      size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      header[name] = dict(dtype=NAMES[np.dtype(dtype)], shape=list(shape),
                          data_offsets=[offset, offset + size])
      offset += size
    header['__metadata__'] = {'format': 'pt'}  # transformers refuses files without it
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)  # keep the data 8-byte aligned
    self.base = 8 + len(text)
    self.header, self.pending = header, set(specs)
    self.f = open(path, 'wb')
    self.f.write(struct.pack('<Q', len(text)) + text)
    self.f.truncate(self.base + offset)

  def write(self, name: str, array: np.ndarray) -> None:
    h = self.header[name]
    if list(array.shape) != h['shape'] or NAMES[array.dtype] != h['dtype']:
      raise ValueError(f'{name}: got {array.dtype}{list(array.shape)}, planned '
                       f'{h["dtype"]}{h["shape"]}.')
    self.f.seek(self.base + h['data_offsets'][0])
    if array.ndim == 0:
      array = array.reshape(1)
    # Blocks of rows: a transposed view is copied a block at a time, not whole.
    rows = max(1, BLOCK_BYTES // max(1, array[0].nbytes))
    for i in range(0, array.shape[0], rows):
      self.f.write(np.ascontiguousarray(array[i:i + rows]).reshape(-1).view(np.uint8).data)
    self.pending.discard(name)

  def close(self) -> None:
    self.f.close()
    if self.pending:
      raise ValueError(f'{self.f.name}: never wrote {sorted(self.pending)[:5]}.')
