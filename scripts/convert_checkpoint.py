"""Hugging Face checkpoints to and from lm run directories.

  python scripts/convert_checkpoint.py --from_hf=HF_DIR --workdir=RUN [--scan_layers]
  python scripts/convert_checkpoint.py --workdir=RUN --to_hf=HF_DIR [--hf_dtype=bfloat16]

HF_DIR is a directory as transformers' save_pretrained writes it (config.json,
safetensors, tokenizer files). Architectures: GPT2LMHeadModel, LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM; BertModel, BertForMaskedLM,
BertForSequenceClassification, RobertaForMaskedLM (the export picks one from the model's
heads, or --hf_arch); T5ForConditionalGeneration (v1.0: ReLU, tied head; v1.1 / Flan-T5:
gated GELU, untied head). Tensors stream one at a time in both directions.
"""
import sys

from absl import app, flags, logging

_FROM_HF = flags.DEFINE_string('from_hf', None, 'HF model directory to import into --workdir.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'Directory to export --workdir into, as HF.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'lm run directory (written or read).')
_SCAN = flags.DEFINE_bool('scan_layers', False, 'Import: stack layers (model.scan_layers).')
_STEP = flags.DEFINE_integer('step', -1, 'Export: checkpoint step (-1: the newest).')
_ARCH = flags.DEFINE_string('hf_arch', None, 'Export: HF architecture (default: the imported '
                            'one, else inferred from the model config).')
_DTYPE = flags.DEFINE_enum('hf_dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                           'Export: dtype of the written tensors.')
_SHARD_GB = flags.DEFINE_float('max_shard_gb', 5.0, 'Export: safetensors shard size limit.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if bool(_FROM_HF.value) == bool(_TO_HF.value):
    sys.exit('Pass exactly one of --from_hf=HF_DIR (import) or --to_hf=HF_DIR (export).')
  from lm.convert import hf
  try:
    if _FROM_HF.value:
      config = hf.convert_from_hf(_FROM_HF.value, _WORKDIR.value, scan_layers=_SCAN.value)
      print(f'Wrote {_WORKDIR.value} ({config.model.n_layers} layers, '
            f'd_model {config.model.d_model}, vocab {config.model.vocab_size}).')
    else:
      out = hf.export_hf(_WORKDIR.value, _TO_HF.value, None if _STEP.value < 0 else _STEP.value,
                         arch=_ARCH.value, dtype=_DTYPE.value,
                         max_shard_bytes=int(_SHARD_GB.value * 1e9))
      print(f'Wrote {_TO_HF.value} ({out["architectures"][0]}, {_DTYPE.value}).')
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
