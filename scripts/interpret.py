"""Looks inside a decoder run for one prompt: attention maps, logit lens, attributions.

  python scripts/interpret.py --workdir=DIR --prompt="def add(a, b):" \
      --what=attention|logit_lens|attribution --out=DIR2 [--target=" return" --steps=64]

attention: DIR2/attention_layer_L.png (each head's map) and attention.npy [L, N, T, T].
logit_lens: DIR2/logit_lens.png, logit_lens.md (the top tokens each layer predicts).
attribution: DIR2/attribution.png and attribution.json: integrated gradients of
log p(target | prompt) over the prompt's tokens (target: the first token of --target, by
default the model's greedy next token), with the completeness check. lm/interpret/tools.py.
"""
import json
import pathlib
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (a decoder).')
_PROMPT = flags.DEFINE_string('prompt', None, 'The text to look at.')
_WHAT = flags.DEFINE_enum('what', 'attention', ['attention', 'logit_lens', 'attribution'],
                          'Which view.')
_OUT = flags.DEFINE_string('out', None, 'Directory for the pictures and numbers.')
_TARGET = flags.DEFINE_string('target', '', 'attribution: the next token to explain '
                              '("": the greedy one).')
_STEPS = flags.DEFINE_integer('steps', 64, 'attribution: integrated-gradient steps.')
_TOP = flags.DEFINE_integer('top', 3, 'logit_lens: tokens per layer and position.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import numpy as np
  from lm.infer import sampling
  from lm.interpret import tools
  out = pathlib.Path(_OUT.value)
  try:
    model, params, _, tokenizer = tools.load(_WORKDIR.value)
    ids = sampling.encode_prompt(tokenizer, _PROMPT.value)
    if len(ids) > model.cfg.max_len:
      raise ValueError(f'The prompt has {len(ids)} tokens; the model reads {model.cfg.max_len}.')
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  out.mkdir(parents=True, exist_ok=True)
  labels = tools.token_labels(tokenizer, ids)
  if _WHAT.value == 'attention':
    probs = tools.attention_maps(model, params, ids)
    np.save(out / 'attention.npy', probs)
    files = [tools.plot_attention(probs, labels, out / f'attention_layer_{l}.png', l)
             for l in range(probs.shape[0])]
    print(json.dumps(dict(shape=list(probs.shape), files=files)))
  elif _WHAT.value == 'logit_lens':
    logp = tools.logit_lens(model, params, ids)
    top = tools.top_tokens(logp, tokenizer, _TOP.value)
    rows = ['| layer | ' + ' | '.join(labels) + ' |', '|---' * (len(labels) + 1) + '|']
    for l, layer in enumerate(top):
      rows.append(f'| {l} | ' + ' | '.join(
          ' '.join(f'{t!r} {p:.2f}' for t, p in pos) for pos in layer) + ' |')
    (out / 'logit_lens.md').write_text('\n'.join(rows) + '\n')
    print('\n'.join(rows))
    print(json.dumps(dict(files=[tools.plot_logit_lens(logp, tokenizer, labels,
                                                       out / 'logit_lens.png'),
                                 str(out / 'logit_lens.md')])))
  else:
    if _TARGET.value:
      target = tokenizer.encode(_TARGET.value)[0]
    else:
      target = int(tools.logit_lens(model, params, ids)[-1, -1].argmax())
    a = tools.attributions(model, params, ids, target, steps=_STEPS.value)
    title = f'attributions to log p({tokenizer.decode([target])!r}) = {a.output:.3f}'
    png = tools.plot_attributions(a.scores, labels, out / 'attribution.png', title)
    result = dict(target_id=target, target=tokenizer.decode([target]), output=a.output,
                  baseline_output=a.baseline_output, completeness_error=a.completeness_error,
                  tokens=labels, scores=a.scores.tolist(), files=[png])
    (out / 'attribution.json').write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'prompt', 'out'])
  app.run(main)
