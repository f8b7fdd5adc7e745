"""Samples from a trained (or imported) run directory (CLI contract: docs/architecture.md).

  python scripts/sample.py --workdir=DIR --prompt="ROMEO:" [--max_new_tokens=N \
      --temperature=T --top_k=K --top_p=P --seed=S]
  python scripts/sample.py --workdir=DIR --ids=1,2,3 [--num_beams=N --length_penalty=A \
      --early_stopping] --json

Several prompts: repeat --prompt or --ids (or separate id lists with ';'). Greedy:
--temperature=0; beam search: --num_beams=N (temperature, top_k, top_p unused), scored as
transformers' generate scores it. --json prints one line a prompt:
{"prompt_ids": [...], "token_ids": [...], "text": "..."}, token_ids the generated ids
only (EOS included when generated; never the prompt or the decoder's start token).

Decoder: prints the prompt and its continuation. Encoder-decoder: the prompt is the
encoder's input; prints the output. Encoder (BERT): fills each mask token ([MASK] or
<mask>) in the prompt with the MLM head's argmax (token_ids: the fills, in order).
"""
import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by train.py.')
_PROMPT = flags.DEFINE_multi_string('prompt', [''], 'Prompt text (repeat for a batch).')
_IDS = flags.DEFINE_multi_string('ids', None, 'Prompt token ids, comma-separated (repeat, or '
                                 "separate prompts with ';'); instead of --prompt.")
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 means greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1: off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the newest).')
_NUM_BEAMS = flags.DEFINE_integer('num_beams', 1, 'Beam search with this many beams (1: off).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 1.0, 'Beam hypotheses score '
                                     'sum_logprobs / length ** length_penalty.')
_EARLY_STOPPING = flags.DEFINE_bool('early_stopping', False, 'Beam search stops a prompt once '
                                    'num_beams hypotheses are done (transformers\' True).')
_JSON = flags.DEFINE_bool('json', False, 'One JSON line per prompt (prompt_ids, token_ids, text).')
_BENCHMARK = flags.DEFINE_integer('benchmark', 0, 'Instead of printing: time this many greedy '
                                  'decodes of max_new_tokens (no EOS stop) after a warm-up '
                                  'one; one JSON line with decode tokens/s.')


def _parse_ids(values) -> list[list[int]]:
  prompts = []
  for value in values:
    for part in value.split(';'):
      try:
        prompts.append([int(x) for x in part.replace(' ', '').split(',') if x])
      except ValueError:
        sys.exit(f'--ids must be comma-separated integers, got {part!r}.')
  return prompts


def _mask_id(tokenizer, config) -> int:
  names = [config.get('task', {}).get('mask_token', '[MASK]'), '[MASK]', '<mask>']
  for name in names:
    try:
      return tokenizer.symbol_id(name)
    except KeyError:
      pass
  sys.exit(f'This encoder\'s tokenizer has no mask token ({", ".join(names)}): sample.py '
           'fills masks with an encoder.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _IDS.value and _PROMPT.present:
    sys.exit('Pass --prompt or --ids, not both.')
  from lm.infer import sampling
  from lm.infer.load import load_run
  try:
    model, params, config, tokenizer = load_run(
        _WORKDIR.value, step=None if _STEP.value < 0 else _STEP.value)
  except FileNotFoundError as e:
    sys.exit(str(e))
  family = config.model.get('family', 'decoder')
  if _IDS.value:
    prompts = _parse_ids(_IDS.value)
    texts = [None] * len(prompts)
  else:
    texts = _PROMPT.value
    prompts = [sampling.encode_prompt(tokenizer, t, family) for t in texts]
  eos = tokenizer.eos_id
  if _BENCHMARK.value:
    import time
    run = lambda: sampling.generate(model, params, prompts, max_new_tokens=_MAX_NEW.value,
                                    temperature=0.0)
    run()  # compiles
    times = []
    for _ in range(_BENCHMARK.value):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    best = min(times)
    print(json.dumps(dict(decode_tokens_per_sec=len(prompts) * _MAX_NEW.value / best,
                          best_s=best, median_s=sorted(times)[len(times) // 2],
                          batch=len(prompts), max_new_tokens=_MAX_NEW.value,
                          quant=config.get('quant', {}).get('method', 'none'))))
    return
  for text, ids in zip(texts, prompts):
    try:
      if family == 'encoder':
        mask = _mask_id(tokenizer, config)
        new = sampling.fill_masks(model, params, [ids], mask, tokenizer.pad_id or 0)[0]
        fills = iter(new)
        out = tokenizer.decode([next(fills) if i == mask else i for i in ids])
      else:
        new = sampling.generate(
            model, params, [ids], max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, eos_id=eos,
            pad_id=tokenizer.pad_id or 0, num_beams=_NUM_BEAMS.value,
            length_penalty=_LENGTH_PENALTY.value, early_stopping=_EARLY_STOPPING.value)[0]
        out = tokenizer.decode(new[:-1] if new and eos is not None and new[-1] == eos else new)
    except ValueError as e:
      sys.exit(str(e))
    if _JSON.value:
      print(json.dumps(dict(prompt_ids=ids, token_ids=new, text=out), ensure_ascii=False))
      continue
    if family == 'decoder':  # the prompt and its continuation
      out = (tokenizer.decode(ids) if text is None else text) + out
    print(out)
    if len(prompts) > 1:
      print('-' * 40)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
