"""nanoGPT's train step in PyTorch eager, timed like scripts/benchmark.py: the reference.

  python scripts/benchmark_nanogpt.py --config=configs/NAME.py [--steps=N] [--config.a.b=...]

The speed targets of configs/shakespeare_char*.py are set against nanoGPT on the same
machine, and these shared machines differ (CPU, matmul peak) from session to session. This
re-types nanoGPT's model.py (GPT-2 blocks, fused q/k/v, scaled_dot_product_attention, tied
head) and the step of its train.py with --device=cpu --compile=False (AdamW, weight decay
on matrices only, clipping 1.0), builds it from the config's model (GPT-2 style only), and
prints the JSON object of scripts/benchmark.py against the same peak (XLA:CPU's best
float32 matmul, lm/train/flops.py), so the two MFUs compare. Needs torch (the test extras).
"""
import json
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after 5 warm-up steps).')


def build(m, torch):
  """nanoGPT's GPT (model.py) at the config's sizes."""
  nn, F = torch.nn, torch.nn.functional
  d, h, t, v, p = m.d_model, m.n_heads, m.max_len, m.vocab_size, m.resid_dropout
  d_ff, bias = m.d_ff or 4 * d, m.use_bias  # nanoGPT's `bias` (train.py default: False)
  norm = lambda: nn.LayerNorm(d, eps=m.norm_eps, bias=bias)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.ln_2 = norm(), norm()
      self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
      self.c_fc, self.mlp_proj = nn.Linear(d, d_ff, bias=bias), nn.Linear(d_ff, d, bias=bias)
      self.drop = nn.Dropout(p)

    def forward(self, x):
      b, s, _ = x.shape
      q, k, v_ = (z.view(b, s, h, d // h).transpose(1, 2)
                  for z in self.c_attn(self.ln_1(x)).split(d, dim=2))
      y = F.scaled_dot_product_attention(q, k, v_, dropout_p=m.attn_dropout if self.training
                                         else 0.0, is_causal=True)
      x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(b, s, d)))
      return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(v, d), nn.Embedding(t, d)
      self.drop = nn.Dropout(m.embed_dropout)
      self.h = nn.ModuleList(Block() for _ in range(m.n_layers))
      self.ln_f = norm()
      self.lm_head = nn.Linear(d, v, bias=False)
      self.wte.weight = self.lm_head.weight  # tied, as GPT-2

    def forward(self, idx, targets):
      x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
      for block in self.h:
        x = block(x)
      logits = self.lm_head(self.ln_f(x))
      return F.cross_entropy(logits.view(-1, v), targets.reshape(-1))

  return GPT()


def main(argv):
  del argv
  import torch
  from lm import config as lm_config
  from lm.train import flops
  config = _CONFIG.value
  if config.model.vocab_size == 0:
    config = lm_config.resolve(config)
  m = config.model
  wanted = dict(pos_embedding='learned', norm='layernorm', mlp='gelu', tie_embeddings=True)
  wrong = {k: m[k] for k, want in wanted.items() if m[k] != want}
  if wrong or m.n_kv_heads not in (0, m.n_heads):
    raise ValueError(f'nanoGPT is GPT-2 style ({wanted}, no GQA); this config has {wrong}'
                     f' n_kv_heads={m.n_kv_heads}. Use a GPT-2 style config.')
  m = type(m)(m.to_dict() | config.runtime.to_dict())  # dropout rates are runtime fields
  peak, how = flops.peak_flops_per_sec()  # before torch's threads start working
  torch.manual_seed(config.train.seed)
  model = build(m, torch).train()
  oc = config.optimizer
  decay = [q for q in model.parameters() if q.dim() >= 2]
  no_decay = [q for q in model.parameters() if q.dim() < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': oc.weight_decay},
                           {'params': no_decay, 'weight_decay': 0.0}],
                          lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps)
  b, t = config.train.batch_size, m.max_len
  gen = torch.Generator().manual_seed(0)
  batches = [torch.randint(m.vocab_size, (b, t + 1), generator=gen) for _ in range(4)]

  def step(i):
    x = batches[i % 4]
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    if oc.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # nanoGPT reads the loss every step

  for i in range(5):
    step(i)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    step(i)
  seconds = time.perf_counter() - start
  # nanoGPT's estimate_mfu: 6 N (no position table) + 12 L D T, as lm/train/flops.py.
  n = sum(q.numel() for q in model.parameters()) - model.wpe.weight.numel()
  fpt = 6.0 * n + 12.0 * m.n_layers * m.d_model * t
  tokens_per_sec = b * t * _STEPS.value / seconds
  print(json.dumps({'reference': 'nanoGPT (PyTorch eager)', 'torch': torch.__version__,
                    'threads': torch.get_num_threads(), 'batch_size': b,
                    'seconds_per_step': seconds / _STEPS.value, 'peak_how': how}))
  print(json.dumps(flops.speed_report(tokens_per_sec, fpt, peak)))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
