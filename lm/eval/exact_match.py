"""Exact match of greedy generation on instruction examples (the README's before/after).

For each example (a {"prompt", "completion"} or {"messages": [...]} dict, or an
lm.data.instruct.Record) the prompt is every token before its last trained piece (the
completion + EOS, or the last assistant turn), encoded exactly as task sft trains
(lm/data/instruct.py); greedy decoding (lm.infer.sampling.generate, with the KV cache) runs
up to the target's length + `extra_tokens` and stops at EOS. An example is right when EOS
came and the decoded text equals the target's decoded text (a prompt/completion record's
completion, for a byte-exact tokenizer). For prompt/completion records this equals task
sft's teacher-forced eval/exact_match.
"""
from __future__ import annotations

from lm.data import instruct
from lm.infer import sampling


def exact_match(model, params, tokenizer, examples, template=None, *, extra_tokens: int = 4,
                batch_size: int = 256, temperature: float = 0.0,
                seed: int = 0) -> tuple[float, list[dict]]:
  """(accuracy, per example {prompt, expected, generated, correct}). template: a
  ChatTemplate for messages records (None: instruct's default). temperature > 0: one
  sampled answer a prompt (from `seed`) instead of the greedy one."""
  records = [r if isinstance(r, instruct.Record) else instruct.parse_record(r, f'example {i}')
             for i, r in enumerate(examples)]
  pairs = [instruct.prompt_and_target(r, tokenizer, template) for r in records]
  eos = tokenizer.eos_id
  max_new = max(len(t) for _, t in pairs) + extra_tokens
  results = []
  for i in range(0, len(pairs), batch_size):
    chunk = pairs[i:i + batch_size]
    outs = sampling.generate(model, params, [p for p, _ in chunk], max_new_tokens=max_new,
                             temperature=temperature, seed=seed + i, eos_id=eos,
                             pad_id=tokenizer.pad_id or 0)
    for (prompt, target), out in zip(chunk, outs):
      expected, generated = tokenizer.decode(target), tokenizer.decode(out)
      results.append(dict(prompt=tokenizer.decode(prompt), expected=expected,
                          generated=generated,
                          correct=bool(out) and out[-1] == eos and generated == expected))
  return sum(r['correct'] for r in results) / max(len(results), 1), results
