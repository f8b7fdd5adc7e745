"""Hugging Face checkpoints to and from lm run directories.

  python scripts/convert_checkpoint.py --from_hf=HF_DIR --workdir=RUN [--scan_layers]
  python scripts/convert_checkpoint.py --workdir=RUN --to_hf=HF_DIR [--hf_dtype=bfloat16]
  python scripts/convert_checkpoint.py --workdir=LORA_RUN --to_peft=PEFT_DIR
  python scripts/convert_checkpoint.py --from_peft=PEFT_DIR --base=BASE --workdir=LORA_RUN

An adapter run (config.peft) exports --to_hf as the merged model (LoRA folded into the
base kernels); --to_peft writes its LoRA as Hugging Face PEFT's adapter_config.json and
adapter_model.safetensors (load them with peft.PeftModel.from_pretrained onto the base
exported --to_hf); --from_peft makes an adapter run of a PEFT LoRA over BASE (an lm run
or a Hugging Face model directory), which sample.py, score.py and the server load.

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
_TO_PEFT = flags.DEFINE_string('to_peft', None, 'Directory to write --workdir\'s LoRA into, '
                               'in Hugging Face PEFT\'s format.')
_FROM_PEFT = flags.DEFINE_string('from_peft', None, 'PEFT LoRA directory to import as an '
                                 'adapter run in --workdir over --base.')
_BASE = flags.DEFINE_string('base', None, '--from_peft: the base model (lm run or HF dir).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  modes = [_FROM_HF.value, _TO_HF.value, _TO_PEFT.value, _FROM_PEFT.value]
  if sum(bool(m) for m in modes) != 1:
    sys.exit('Pass exactly one of --from_hf=HF_DIR, --to_hf=HF_DIR, --to_peft=DIR or '
             '--from_peft=DIR.')
  from lm.convert import hf
  from lm.convert import peft as peft_io
  try:
    if _TO_PEFT.value:
      out = peft_io.export_run(_WORKDIR.value, _TO_PEFT.value)
      print(f'Wrote {_TO_PEFT.value} (LoRA r={out["r"]} on {", ".join(out["target_modules"])}).')
    elif _FROM_PEFT.value:
      if not _BASE.value:
        sys.exit('--from_peft needs --base=BASE (the lm run or HF directory it adapts).')
      config = peft_io.import_run(_FROM_PEFT.value, _BASE.value, _WORKDIR.value)
      print(f'Wrote {_WORKDIR.value} (LoRA r={config.peft.rank} over {_BASE.value}).')
    elif _FROM_HF.value:
      config = hf.convert_from_hf(_FROM_HF.value, _WORKDIR.value, scan_layers=_SCAN.value)
      print(f'Wrote {_WORKDIR.value} ({config.model.n_layers} layers, '
            f'd_model {config.model.d_model}, vocab {config.model.vocab_size}).')
    else:  # an adapter run exports merged (peft_io.merged_run: a params-only copy)
      with peft_io.merged_run(_WORKDIR.value) as workdir:
        out = hf.export_hf(workdir, _TO_HF.value, None if _STEP.value < 0 else _STEP.value,
                           arch=_ARCH.value, dtype=_DTYPE.value,
                           max_shard_bytes=int(_SHARD_GB.value * 1e9))
      print(f'Wrote {_TO_HF.value} ({out["architectures"][0]}, {_DTYPE.value}).')
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
