"""A chunk index: documents cut into overlapping token windows, embedded, searched.

Exact search is one matrix product over the normalised embeddings (inner product = cosine).
Approximate search, for stores too large for that, is FAISS's HNSW graph (IndexHNSWFlat,
inner product): FAISS installs from PyPI as one wheel that needs only numpy (ScaNN pins
numpy 2.0.x and protobuf and ships x86 Linux wheels only), and HNSW needs no training pass.

A saved index is a directory: embeddings.npy (float32 [N, D]), chunks.jsonl ({"text",
"source", "chunk"} per row, in the embeddings' order), meta.json (the encoder run, pooling,
chunking) and, when built approximate, hnsw.faiss.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import pathlib

import numpy as np

FILES = ('embeddings.npy', 'chunks.jsonl', 'meta.json')


def windows(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
  """[start, end) windows of `size` over n items, each overlapping the last by `overlap`;
  the last window ends at n. Any run of up to overlap + 1 items lies whole in one window."""
  if size <= 0 or not 0 <= overlap < size:
    raise ValueError(f'Chunks need size > 0 and 0 <= overlap < size (got size={size}, '
                     f'overlap={overlap}).')
  out, start = [], 0
  while True:
    out.append((start, min(start + size, n)))
    if start + size >= n:
      return out
    start += size - overlap


def chunk(text: str, tokenizer, size: int, overlap: int) -> list[str]:
  """`text` cut into windows of `size` tokens of `tokenizer`, decoded back to text."""
  ids = tokenizer.encode(text)
  if not ids:
    return []
  return [tokenizer.decode(ids[a:b]).strip() for a, b in windows(len(ids), size, overlap)]


def read_docs(pattern: str) -> list[dict]:
  """{"source", "text"} of each file the glob (or comma-separated globs) matches; *.jsonl
  files give one document per line ({"text", optional "source"})."""
  paths = sorted({p for part in pattern.split(',') for p in glob.glob(part, recursive=True)
                  if pathlib.Path(p).is_file()})
  if not paths:
    raise FileNotFoundError(f'--docs={pattern!r} matches no file; give a glob such as '
                            "'docs/**/*.txt' (quoted, so the shell leaves it alone).")
  docs = []
  for path in paths:
    if path.endswith('.jsonl'):
      for i, line in enumerate(pathlib.Path(path).read_text().splitlines()):
        if line.strip():
          record = json.loads(line)
          if not isinstance(record, dict) or not isinstance(record.get('text'), str):
            raise ValueError(f'{path}:{i + 1} is not {{"text": "...", "source": "..."}}.')
          docs.append(dict(source=record.get('source', f'{path}:{i + 1}'), text=record['text']))
    else:
      docs.append(dict(source=path, text=pathlib.Path(path).read_text(errors='replace')))
  return docs


@dataclasses.dataclass
class Index:
  embeddings: np.ndarray  # float32 [N, D], rows of unit norm
  chunks: list[dict]  # {"text", "source", "chunk"} per row
  meta: dict
  hnsw: object = None  # a faiss.IndexHNSWFlat over the same rows, or None

  def __len__(self) -> int:
    return len(self.chunks)

  def search(self, queries_QD: np.ndarray, k: int, approximate: bool | None = None):
    """(scores [Q, k], row ids [Q, k]) of the k most similar chunks, best first (k capped
    at the index size). approximate: HNSW (None: when the index has it)."""
    k = min(k, len(self))
    queries_QD = np.ascontiguousarray(queries_QD, np.float32)
    if approximate is None:
      approximate = self.hnsw is not None
    if approximate:
      if self.hnsw is None:
        raise ValueError('This index was built without approximate search; rebuild it with '
                         'scripts/rag.py index --approximate, or search exactly.')
      self.hnsw.hnsw.efSearch = max(64, 2 * k)
      scores, ids = self.hnsw.search(queries_QD, k)
      return scores, ids.astype(np.int64)
    scores_QN = queries_QD @ self.embeddings.T
    ids = np.argpartition(-scores_QN, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores_QN, ids, 1), axis=1, kind='stable')
    ids = np.take_along_axis(ids, order, 1)
    return np.take_along_axis(scores_QN, ids, 1), ids

  def build_hnsw(self, neighbours: int = 32) -> None:
    import faiss  # lazy: only approximate search needs it
    index = faiss.IndexHNSWFlat(self.embeddings.shape[1], neighbours,
                                faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 2 * neighbours
    index.add(np.ascontiguousarray(self.embeddings, np.float32))
    self.hnsw = index

  def save(self, directory) -> None:
    out = pathlib.Path(directory)
    if out.exists() and any(out.iterdir()) and not (out / 'meta.json').exists():
      raise FileExistsError(f'{out} holds files but no index; give an empty or new directory.')
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / 'embeddings.npy', self.embeddings.astype(np.float32))
    (out / 'chunks.jsonl').write_text(''.join(json.dumps(c) + '\n' for c in self.chunks))
    meta = dict(self.meta, size=len(self), dim=int(self.embeddings.shape[1]),
                approximate=self.hnsw is not None)
    (out / 'meta.json').write_text(json.dumps(meta, indent=2) + '\n')
    if self.hnsw is not None:
      import faiss  # lazy
      faiss.write_index(self.hnsw, str(out / 'hnsw.faiss'))
    elif (out / 'hnsw.faiss').exists():
      (out / 'hnsw.faiss').unlink()  # a stale graph of an older index


def load(directory) -> Index:
  d = pathlib.Path(directory)
  missing = [f for f in FILES if not (d / f).exists()]
  if missing:
    raise FileNotFoundError(f'{d} is not an index (missing {", ".join(missing)}); build one '
                            'with scripts/rag.py index --workdir=ENCODER_RUN --docs=GLOB '
                            f'--index={d}.')
  chunks = [json.loads(line) for line in (d / 'chunks.jsonl').read_text().splitlines()]
  index = Index(np.load(d / 'embeddings.npy'), chunks, json.loads((d / 'meta.json').read_text()))
  if (d / 'hnsw.faiss').exists():
    import faiss  # lazy
    index.hnsw = faiss.read_index(str(d / 'hnsw.faiss'))
  return index


def build(embedder, docs: list[dict], chunk_tokens: int, overlap: int,
          approximate: bool = False, log=print) -> Index:
  """Chunks `docs` ({"source", "text"}) with the embedder's tokenizer, embeds the chunks."""
  chunks = [dict(text=text, source=d['source'], chunk=i) for d in docs
            for i, text in enumerate(chunk(d['text'], embedder.tokenizer, chunk_tokens, overlap))]
  if not chunks:
    raise ValueError('The documents hold no text to index.')
  if chunk_tokens > embedder.max_len:
    raise ValueError(f'--chunk_tokens={chunk_tokens} exceeds the encoder\'s model.max_len='
                     f'{embedder.max_len}; lower it.')
  embeddings = embedder.embed([c['text'] for c in chunks])
  log(f'Indexed {len(chunks)} chunks of {len(docs)} documents ({embeddings.shape[1]} dims).')
  index = Index(embeddings, chunks, dict(embedder.describe(), chunk_tokens=chunk_tokens,
                                         overlap=overlap))
  if approximate:
    index.build_hnsw()
  return index
