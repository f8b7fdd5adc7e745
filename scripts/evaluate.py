"""Evaluates a run directory on tasks; prints a markdown table and writes it as JSON.

  python scripts/evaluate.py --workdir=DIR --tasks=NAME[,NAME...] [--num_fewshot=K]
      [--limit=N] [--batch_size=B] [--seed=S] [--out=FILE.json]

DIR: any run (a base, a fine-tune, an adapter run, an imported model). A task is an embedded
one (corpus, finetune, finetune_choice, finetune_choice_robust, bias_probe), KIND:PATH
(perplexity:corpus.txt, multiple_choice:data.jsonl, generation:..., classification:...,
bias_pairs:data.jsonl or a CrowS-Pairs .csv) or a task file FILE.yaml (lm/eval/tasks.py).
FILE.json holds {"results": {TASK: {METRIC: value, METRIC_stderr: ..., "n": ...}},
"config": {...}}; FILE.samples.jsonl one line per example (inputs, outputs, scores), and a
classification task's confusion matrix goes to FILE.TASK.confusion.png. Default FILE:
DIR/eval.json.
"""
import dataclasses
import json
import os
import re
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_TASKS = flags.DEFINE_string('tasks', 'corpus,finetune_choice', 'Comma-separated tasks.')
_FEWSHOT = flags.DEFINE_integer('num_fewshot', None, 'Few-shot examples (default: the task\'s).')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Examples per task (0: all).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Rows per forward pass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of few-shot draws and perturbations.')
_MAX_LEN = flags.DEFINE_integer('max_len', None, 'Perplexity window (default: the context).')
_STRIDE = flags.DEFINE_integer('stride', None, 'Perplexity stride (default: half the window).')
_OUT = flags.DEFINE_string('out', '', 'Results JSON ("": DIR/eval.json).')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the newest).')


def _settings(task) -> dict:
  return {k: v for k, v in dataclasses.asdict(task).items() if k != 'records'}


def results_json(results: dict) -> dict:
  """{TASK: {METRIC: value, METRIC_stderr: stderr, "n": examples}}."""
  out = {}
  for name, r in results.items():
    row = dict(r.metrics)
    row.update({f'{k}_stderr': v for k, v in r.stderr.items()})
    row['n'] = r.n
    out[name] = row
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax
  from lm.eval import harness, metrics, tasks
  from lm.infer.load import load_run
  from lm.train import partitioning
  try:
    specs = [s for s in _TASKS.value.split(',') if s.strip()]
    if not specs:
      raise ValueError('--tasks is empty; name at least one task.')
    chosen = [tasks.resolve(s, num_fewshot=_FEWSHOT.value, max_len=_MAX_LEN.value,
                            stride=_STRIDE.value) for s in specs]
    from lm.train import checkpoint
    config = checkpoint.read_config(_WORKDIR.value)
    mesh = partitioning.make_mesh(config.mesh) if jax.device_count() > 1 else None
    model, params, config, tokenizer = load_run(
        _WORKDIR.value, mesh=mesh, step=None if _STEP.value < 0 else _STEP.value)
    evaluator = harness.Evaluator(model, params, tokenizer, config, batch_size=_BATCH.value,
                                  seed=_SEED.value, progress=sys.stderr.isatty())
    results = {}
    for task in chosen:
      results[task.name] = evaluator.run(task, limit=_LIMIT.value)
  except (FileNotFoundError, ValueError, KeyError) as e:
    sys.exit(f'error: {e}')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'eval.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  stem = out[:-5] if out.endswith('.json') else out
  with open(out, 'w') as f:
    json.dump(dict(results=results_json(results),
                   config=dict(workdir=_WORKDIR.value, step=_STEP.value, limit=_LIMIT.value,
                               batch_size=_BATCH.value, seed=_SEED.value,
                               family=config.model.family,
                               tasks={t.name: _settings(t) for t in chosen})), f, indent=1)
  with open(stem + '.samples.jsonl', 'w') as f:
    for name, r in results.items():
      for i, s in enumerate(r.samples):
        f.write(json.dumps(dict(task=name, index=i, **s)) + '\n')
  for name, r in results.items():
    if r.confusion is not None:
      safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', name)
      metrics.confusion_png(r.confusion[0], r.confusion[1], f'{stem}.{safe}.confusion.png',
                            title=name)
  print(harness.markdown_table(results))
  print(f'\nwrote {out} and {stem}.samples.jsonl')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
