"""Trains a SentencePiece tokenizer (BPE or unigram) on a dataset split or on text files.

  python scripts/train_tokenizer.py --path='corpus/*.txt' --vocab_size=8000 --output=spm.model
  python scripts/train_tokenizer.py --dataset=tiny_shakespeare --model_type=unigram \
      --vocab_size=2000 --output=spm.model        # TFDS catalog: needs the internet once
  python scripts/train_tokenizer.py --config=configs/NAME.py --output=spm.model   # its data

Then train with --config.data.tokenizer=sentencepiece --config.data.tokenizer_path=spm.model.
Only the train split is used (the same deterministic split the trainer uses), so
the validation text stays unseen. Settings keep decode(encode(x)) == x (see
lm.data.tokenizers.train_sentencepiece).
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lm import config as lm_config
from lm.data import sources
from lm.data import tokenizers

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Optional config: its data section.')
_DATASET = flags.DEFINE_string('dataset', None, 'default | text_files | a TFDS catalog name '
                               '(default: text_files when --path is given).')
_PATH = flags.DEFINE_string('path', None, 'Text/JSON-lines file, directory, glob or comma list.')
_JSON_FIELD = flags.DEFINE_string('json_field', None, 'Text field of JSON lines / TFDS examples.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Split to train on; "all" for every split.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Where datasets are built (~/.cache/lm/tfds).')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 8000, 'Number of pieces, specials included.')
_MODEL_TYPE = flags.DEFINE_enum('model_type', 'bpe', ['bpe', 'unigram'], 'SentencePiece model.')
_BYTE_FALLBACK = flags.DEFINE_bool('byte_fallback', True, 'Unseen characters become byte pieces.')
_USER_SYMBOLS = flags.DEFINE_list('user_symbols', [], 'Extra whole symbols, e.g. [MASK].')
_MAX_CHARS = flags.DEFINE_integer('max_chars', 100_000_000, 'Train on at most this much text.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the .model file.', required=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset load at INFO
  config = _CONFIG.value if _CONFIG.value is not None else lm_config.base_config()
  with config.unlocked():
    if _PATH.value is not None:
      config.data.path = _PATH.value
      config.data.dataset = 'text_files'
    for name, flag in (('dataset', _DATASET), ('json_field', _JSON_FIELD),
                       ('data_dir', _DATA_DIR)):
      if flag.value is not None:
        config.data[name] = flag.value
  split = None if _SPLIT.value == 'all' else _SPLIT.value
  try:
    proto = tokenizers.train_sentencepiece(
        sources.iter_texts(config, split), vocab_size=_VOCAB_SIZE.value,
        model_type=_MODEL_TYPE.value, byte_fallback=_BYTE_FALLBACK.value,
        user_symbols=_USER_SYMBOLS.value, max_chars=_MAX_CHARS.value)
  except (ValueError, FileNotFoundError, RuntimeError) as e:  # a user's mistake: no traceback
    sys.exit(f'train_tokenizer: {e}')
  with open(_OUTPUT.value, 'wb') as f:
    f.write(proto)
  tok = tokenizers.SentencePieceTokenizer(proto)
  sample = ''.join(t for _, t in zip(range(200), sources.iter_texts(config, split)))[:1_000_000]
  print(f'wrote {_OUTPUT.value}: {tok.vocab_size} pieces ({_MODEL_TYPE.value}), '
        f'{len(sample) / max(len(tok.encode(sample)), 1):.2f} characters per token on the '
        'start of the training text')


if __name__ == '__main__':
  app.run(main)
