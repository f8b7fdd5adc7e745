"""Tokenizers, datasets and input pipelines (see tokenizers.py, sources.py, pipeline.py)."""
from lm.data.pipeline import make_eval_iter
from lm.data.pipeline import make_train_iter
from lm.data.pipeline import measure_throughput
from lm.data.pipeline import pack
from lm.data.pipeline import PackedRows
from lm.data.tokenizers import build_tokenizer
from lm.data.tokenizers import ByteTokenizer
from lm.data.tokenizers import CharTokenizer
from lm.data.tokenizers import load_tokenizer
from lm.data.tokenizers import SentencePieceTokenizer
from lm.data.tokenizers import Tokenizer
from lm.data.tokenizers import train_sentencepiece
