"""Tokenizers, datasets and input pipelines (see tokenizers.py, sources.py, pipeline.py).

Only the tokenizers are imported here: the pipeline (Grain) and the sources (TFDS)
load on first use of one of their names (`lm.data.make_train_iter`, `lm.data.sources`),
so sampling and scoring, which need a tokenizer alone, never import them.
"""
import importlib

from lm.data.tokenizers import build_tokenizer
from lm.data.tokenizers import ByteTokenizer
from lm.data.tokenizers import CharTokenizer
from lm.data.tokenizers import load_tokenizer
from lm.data.tokenizers import register_tokenizer
from lm.data.tokenizers import SentencePieceTokenizer
from lm.data.tokenizers import Tokenizer
from lm.data.tokenizers import train_sentencepiece

# Name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    'make_eval_iter': 'lm.data.pipeline',
    'make_train_iter': 'lm.data.pipeline',
    'measure_throughput': 'lm.data.pipeline',
    'pack': 'lm.data.pipeline',
    'PackedRows': 'lm.data.pipeline',
}
_LAZY_MODULES = ('pipeline', 'sources')

__all__ = ['build_tokenizer', 'ByteTokenizer', 'CharTokenizer', 'load_tokenizer',
           'register_tokenizer', 'SentencePieceTokenizer', 'Tokenizer', 'train_sentencepiece',
           *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
  elif name in _LAZY_MODULES:
    value = importlib.import_module(f'{__name__}.{name}')
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))
