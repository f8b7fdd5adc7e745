"""The config schema every experiment starts from.

Each `configs/NAME.py` calls `base_config(family)` and overrides fields. Sections:
`model` (architecture, one schema per family, saved with the checkpoint and compared on
resume), `runtime` (dtype, remat, scan, attention, dropout: free to change on resume),
`task`, `peft`, `data`, `train`, `optimizer`, `checkpoint`, `mesh`, `prune`, `quant`,
`eval`, and `init_from`. The returned ConfigDict is locked, so a misspelt
`--config.train.stpes=...` is rejected with the valid keys near it instead of silently adding
a field.
"""
from __future__ import annotations

import difflib

import ml_collections as mlc

from lm.data.tokenizers import build_tokenizer


# Architecture fields per model family: tied to a checkpoint, compared on resume.
# Field meanings in the family's module (lm/models/decoder.py, ...).
MODEL_SCHEMAS = {
    'decoder': dict(
        family="decoder",
        vocab_size=0,  # 0: taken from the tokenizer at the start of training
        max_len=128,  # context length (block size)
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=0,  # 0: same as n_heads (MHA); 1: MQA; else GQA
        head_dim=0,  # 0: d_model // n_heads
        d_ff=0,  # 0: 4 * d_model
        pos_embedding="learned",  # learned | rope
        rope_theta=10000.0,
        rope_scaling=dict(
            type="none",  # none | linear | llama3
            factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_len=8192),
        norm="layernorm",  # layernorm | rmsnorm
        norm_eps=1e-5,
        mlp="gelu",  # gelu | swiglu
        use_bias=True,
        tie_embeddings=True,
        sliding_window=0,  # 0: none (Mistral uses 4096)
        init_std=0.02,
        num_labels=0,  # > 0: a classifier on the last non-pad token (task classification)
    ),
    # BERT / RoBERTa (lm/models/encoder.py): post-LayerNorm blocks, exact GELU, learned
    # absolute positions plus token types, bidirectional attention over non-padding.
    'encoder': dict(
        family="encoder",
        vocab_size=0,
        max_len=128,  # rows the data pipeline cuts; <= max_positions - pos_offset
        max_positions=512,  # rows of the position table (HF max_position_embeddings)
        pos_offset=0,  # RoBERTa: padding_idx + 1 = 2 (positions start there)
        type_vocab_size=2,  # token types (segment A/B); RoBERTa: 1
        d_model=128,
        n_layers=2,
        n_heads=4,
        d_ff=0,  # 0: 4 * d_model
        norm_eps=1e-12,
        pooler=True,  # tanh dense on the first token (BertModel's pooler)
        mlm_head=True,  # dense + GELU + LayerNorm, tied decoder + output bias
        num_labels=0,  # > 0: a sequence-classification head on the pooled output
        init_std=0.02,
    ),
    # T5 (lm/models/encdec.py): relative position buckets, RMS norm without bias, no biases.
    'encdec': dict(
        family="encdec",
        vocab_size=0,
        max_len=128,  # encoder input rows the data pipeline makes
        max_target_len=32,  # decoder rows (span corruption: from its noise density)
        d_model=128,
        n_layers=2,  # encoder layers
        n_decoder_layers=0,  # 0: n_layers
        n_heads=4,
        head_dim=0,  # d_kv; 0: d_model // n_heads
        d_ff=0,  # 0: 4 * d_model
        mlp="relu",  # relu (T5 v1.0) | gated_gelu (v1.1, Flan-T5)
        relative_buckets=32,
        relative_max_distance=128,
        norm_eps=1e-6,
        tie_embeddings=True,  # v1.0: tied head, scaled by d_model**-0.5; v1.1: untied
        decoder_start_id=0,  # T5 starts decoding from the pad id
        init_std=1.0,  # T5's init factor
    ),
}

# How the model runs, not what it is: may change between runs and on resume.
RUNTIME_DEFAULTS = dict(
    dtype="float32",  # compute dtype: float32 | bfloat16
    param_dtype="float32",  # stored params (and optimizer state)
    remat="none",  # none | full | save_dots
    scan_layers=False,  # one scanned layer stack (faster compiles for deep models)
    # auto: splash on TPU, cuDNN on GPU (16-bit), the C++ kernel on one CPU device, else
    # xla | splash | cudnn | cpu (chosen once per run in lm/ops/backend.py)
    attention="auto",
    embed_dropout=0.0,
    attn_dropout=0.0,
    resid_dropout=0.0,
    cpu_matmuls="ynn",  # XLA:CPU's matmul library: ynn (its default) | onednn (backend.py)
)
RUNTIME_FIELDS = tuple(RUNTIME_DEFAULTS)


def base_config(family: str = 'decoder') -> mlc.ConfigDict:
  if family not in MODEL_SCHEMAS:
    raise ValueError(f'Unknown model.family {family!r}; known: {sorted(MODEL_SCHEMAS)}.')
  c = mlc.ConfigDict()
  c.model = mlc.ConfigDict(MODEL_SCHEMAS[family])
  c.runtime = mlc.ConfigDict(RUNTIME_DEFAULTS)
  # A new run starting from weights: an lm run directory (its model config and tokenizer
  # come along) or a Hugging Face model directory. "" trains from scratch.
  c.init_from = ""
  # What the trainer trains (lm/train/tasks.py) and the task's own options.
  c.task = mlc.ConfigDict(dict(
      name="causal_lm",
      z_loss=0.0,  # causal_lm: PaLM's auxiliary log(Z)^2 loss
      # masked_lm (BERT): the share of tokens selected (of those 80% [MASK], 10% random,
      # 10% kept) and the mask symbol (the tokenizer's; bytes/char/sentencepiece add it via
      # --config.data.user_symbols="('[MASK]',)")
      mask_rate=0.15,
      mask_token="[MASK]",
      # span_corruption (T5): the share of noise tokens and the mean noise span length
      noise_density=0.15,
      mean_noise_span_length=3.0,
      # classification: label names in id order; () = the train data's string labels,
      # sorted (set here by the run, so config.json records the mapping), or int labels
      labels=(),
      # sft (instruction tuning; lm/data/instruct.py): a Jinja chat template (the text, or
      # a file holding it); "" -> the tokenizer's own (an imported Hugging Face tokenizer's
      # chat_template), else the plain default. The loss is on completion / assistant
      # tokens only. With data.path "" the package's embedded fine-tuning set is used
      # (lm/data/finetune_sets.py): finetune_examples training examples, finetune_eval
      # held out.
      chat_template="",
      prompt_loss_weight=0.0,  # sft (decoder): > 0 also trains the prompt's tokens, so weighted
      finetune_set="tasks",  # the embedded set: tasks (finetune_sets.py) | rag (lm/rag/corpus)
      finetune_examples=4000,
      finetune_eval=200,
      # dpo (lm/train/align.py): beta, the KL strength / implicit-reward scale;
      # label_smoothing > 0: conservative DPO (sigmoid loss); loss_type sigmoid | ipo (grpo:
      # sigmoid = TRL's GRPO loss, or dr_grpo);
      # reference step (in the step: with LoRA/QLoRA the base, lora_b = 0; else a frozen
      # copy of the initial params) | precomputed (once, from init_from's weights);
      # rpo_alpha > 0: + alpha * the chosen response's NLL per token (dpo: RPO; reward: GRM)
      beta=0.1,
      label_smoothing=0.0,
      loss_type="sigmoid",
      reference="step",
      rpo_alpha=0.0,
      # grpo / ppo (RL from feedback, lm/train/rl.py): prompts of the sft data, rewarded
      reward="exact_match",  # a registered reward (lm/train/rewards.py) or rm:RUN_DIR
      num_generations=0,  # responses per prompt (GRPO's group); 0: grpo 8, ppo 1
      max_prompt_len=64,  # prompts left-padded to this; longer ones skipped (counted)
      max_new_tokens=32,  # response cap (max_prompt_len + this <= model.max_len)
      temperature=0.7,  # rollout sampling temperature (log-probs from logits / T)
      epsilon=0.2,  # grpo: ratio clip
      kl_beta=0.04,  # grpo: k3 KL weight (TRL's beta; 0: no reference pass)
      kl_coef=0.05,  # ppo: per-token KL penalty in the reward
      cliprange=0.2,  # ppo: policy ratio clip
      cliprange_value=0.2,  # ppo: value clip around the rollout's values
      vf_coef=0.1,  # ppo: value loss weight
      gamma=1.0,  # ppo: GAE discount
      lam=0.95,  # ppo: GAE lambda
      updates_per_batch=1,  # optimizer updates on each rollout (TRL's num_iterations)
      # distill (lm/train/distill.py): a frozen teacher run of the same tokenizer;
      # loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross entropy
      teacher="",
      distill_alpha=0.5,
      distill_temperature=2.0,
      # embedding (lm/rag/embed.py): (query, passage) pairs, InfoNCE over in-batch negatives;
      # pooling mean | cls | last; the logits' temperature; queries cut to query_len (0: max_len)
      pooling="mean",
      embed_temperature=0.05,
      query_len=0,
  ))

  # Parameter-efficient fine-tuning (lm/peft.py), from config.init_from's weights:
  # none (full fine-tuning) | lora | qlora (LoRA over an NF4 base) | prompt | prefix.
  c.peft = mlc.ConfigDict(dict(
      method="none",
      rank=8,  # lora/qlora
      alpha=16.0,  # scale alpha / rank (rslora: alpha / sqrt(rank))
      rslora=False,
      dropout=0.0,  # on the adapter's input
      # regex (re.search) over the projections' module paths, e.g. layers_0/attn/query,
      # layers_3/mlp/wi_0 (scanned: layers/attn/query)
      targets=r"attn/(query|key|value|out)$",
      num_virtual_tokens=16,  # prompt / prefix length
      prompt_init="vocab",  # prompt: vocab (embeddings of random tokens) | random
      prefix_hidden=0,  # prefix: the reparameterisation MLP's width; 0 -> d_model
      nf4_block=64,  # qlora: weights per absmax block (double-quantised per 256 blocks)
      train_also=r"classifier",  # regex of other params trained too (new heads), "" none
  ))

  # Data: read by lm.data (sources.py, tokenizers.py, pipeline.py).
  c.data = mlc.ConfigDict(dict(
      # default: the interpreter's stdlib sources (~4 MB, no download) | text_files |
      # a TFDS catalog name (tiny_shakespeare, lm1b, c4/en: needs the internet once)
      dataset="default",
      path="",  # text_files: file, dir, glob or comma list (local or gs://); *.jsonl: JSON lines
      json_field="text",  # text field of JSON-lines records and of TFDS catalog examples
      # text_files/default splits: one file by position (first 1-val-test train, as
      # nanoGPT), many files by a hash of their names
      val_fraction=0.1,
      test_fraction=0.0,
      train_split="train",
      eval_split="validation",  # e.g. "test" for lm1b, which has no validation split
      tokenizer="bytes",  # bytes (256 + pad/bos/eos) | char (corpus alphabet only) | sentencepiece
      tokenizer_path="",  # a SentencePiece .model file to load
      vocab_size=0,  # SentencePiece pieces to train on the train split when no tokenizer_path
      spm_model_type="bpe",  # bpe | unigram (SentencePiece training)
      byte_fallback=True,  # SentencePiece training: unseen characters become byte pieces
      user_symbols=(),  # extra symbols matched in text ([MASK], T5 sentinels, chat markers)
      add_bos=False,  # per document, when the tokenizer has a bos id
      add_eos=True,  # per document, when the tokenizer has an eos id
      data_dir="",  # where TFDS builds and token caches go; "" -> ~/.cache/lm/tfds
      shuffle=True,  # shuffle packed rows (reshuffled each epoch from train.seed)
      num_workers=0,  # Grain worker processes (0: batches made in the caller's thread)
      # Labelled JSON lines (task classification, lm/data/labeled.py): records
      # {json_field, label_field} or {pair_fields[0], pair_fields[1], label_field}
      label_field="label",
      pair_fields=("text_a", "text_b"),
      eval_path="",  # the eval records; "" -> the last val_fraction of data.path's
  ))

  c.train = mlc.ConfigDict(dict(
      steps=1000,
      batch_size=8,  # global batch, in sequences
      microbatches=1,  # gradient accumulation: batch_size % microbatches == 0
      steps_per_call=1,  # train steps per jitted call (lax.scan): dispatch paid once per call
      # causal_lm / sft rows of this many tokens (0: model.max_len); shorter rows for a
      # long-context model's fine-tuning (the architecture, max_len included, stays the
      # source's with init_from)
      seq_len=0,
      seed=0,
      log_every=50,
      eval_every=250,
      eval_steps=20,
      sample_prompt="",  # printed sample at the end ("" -> no sample)
      sample_tokens=200,
  ))

  c.optimizer = mlc.ConfigDict(dict(
      name="adamw",  # adamw | adafactor | lion | sgd
      lr=1e-3,
      min_lr=1e-4,
      warmup_steps=100,
      schedule="cosine",  # cosine | linear | inverse_sqrt | constant
      decay_steps=0,  # 0: train.steps
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      momentum=0.9,  # sgd
      weight_decay=0.1,
      weight_decay_mask="2d",  # 2d (matrices only, as GPT-2) | all | none
      grad_clip=1.0,  # 0: off
      trainable="all",  # regex over parameter paths; "all" trains everything
      fused=True,  # AdamW as one C++ op on one CPU device (optim.fused_update)
  ))

  c.checkpoint = mlc.ConfigDict(dict(
      every_steps=500,
      keep=2,
      keep_best=True,
      async_save=True,
  ))

  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Magnitude pruning during training (lm/compress/prune.py): masks in the optimizer state.
  c.prune = mlc.ConfigDict(dict(
      method="none",  # none | magnitude
      sparsity=0.5,  # final share of zeros (N:M: 1 - N/M)
      pattern="unstructured",  # unstructured | N:M, e.g. 2:4 along the input axis
      scope="global",  # unstructured: one threshold over all targets (global) or per kernel
      schedule="gradual",  # gradual (Zhu & Gupta's cubic) | oneshot (all at begin_step)
      begin_step=0,
      end_step=0,  # gradual: full sparsity here (0: 3/4 of train.steps)
      update_every=10,  # steps between mask updates
      targets=r"(attn|mlp)/[^/]+/kernel$",  # regex over param paths
  ))

  # Post-training weight quantization (lm/compress/quantize.py; written by
  # scripts/quantize.py, read by everything that loads a run; not trainable).
  c.quant = mlc.ConfigDict(dict(
      method="none",  # none | int8 (per channel) | int4 (groups) | nf4 (blocks of 64)
      group_size=128,  # int4: consecutive inputs sharing a scale
      block_size=64,  # nf4
      asymmetric=False,  # int8/int4: a zero point (min) beside the scale
      targets="",  # regex over Linear module paths ("": every projection)
      activations="none",  # int8: w8a8, per-token int8 inputs and int8 matmuls (int8 only)
  ))

  # Evaluation tasks (lm/eval/tasks.py, as scripts/evaluate.py --tasks takes them) run at
  # train.eval_every beside the task's own eval, logged as eval/TASK/METRIC.
  c.eval = mlc.ConfigDict(dict(
      tasks="",  # comma-separated: embedded names, KIND:PATH or FILE.yaml ("": none)
      limit=0,  # examples per task (0: all)
      num_fewshot=-1,  # -1: each task's own
      batch_size=32,
      seed=0,
  ))

  c.lock()
  return c


def check_keys(config: mlc.ConfigDict, reference: mlc.ConfigDict | None = None,
               prefix: str = "") -> None:
  """Raises a clear error for keys the schema (of the config's model family) does not know."""
  if reference is None:
    family = config.get('model', {}).get('family', 'decoder')
    reference = base_config(family)
  for key, value in config.items():
    if key not in reference:
      if prefix == 'model.' and key in RUNTIME_FIELDS:
        raise KeyError(f"'model.{key}' is a runtime field now: set runtime.{key} "
                       f"(--config.runtime.{key}=...).")
      near = difflib.get_close_matches(key, list(reference.keys()), n=3)
      raise KeyError(
          f"Unknown config key '{prefix}{key}'. Did you mean: "
          f"{', '.join(prefix + n for n in near) or '(none close)'}? "
          f"Valid keys here: {', '.join(sorted(reference.keys()))}.")
    if isinstance(value, mlc.ConfigDict) and isinstance(reference[key], mlc.ConfigDict):
      check_keys(value, reference[key], prefix + key + ".")


def gpt2_model(**overrides) -> dict:
  """GPT-2 style: learned positions, LayerNorm, GELU, biases, tied embeddings."""
  return dict(dict(family="decoder", vocab_size=50257, max_len=1024, pos_embedding="learned",
                   norm="layernorm", norm_eps=1e-5, mlp="gelu", use_bias=True,
                   tie_embeddings=True), **overrides)


def llama_model(**overrides) -> dict:
  """LLaMA style: RoPE, RMSNorm, SwiGLU, no biases, untied head (GQA via n_kv_heads)."""
  return dict(dict(family="decoder", vocab_size=32000, max_len=4096, pos_embedding="rope",
                   rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                   use_bias=False, tie_embeddings=False), **overrides)


def t5_model(**overrides) -> dict:
  """T5 v1.0 (encdec family): ReLU MLP, head tied to the embedding (scaled by d**-0.5),
  32 relative buckets up to distance 128, vocab 32128 (v1.1: mlp="gated_gelu",
  tie_embeddings=False)."""
  return dict(dict(family="encdec", vocab_size=32128, max_len=512, max_target_len=114,
                   mlp="relu", tie_embeddings=True, relative_buckets=32,
                   relative_max_distance=128, norm_eps=1e-6, decoder_start_id=0,
                   init_std=1.0), **overrides)


def row_length(config) -> int:
  """Tokens per packed causal_lm / sft row: train.seq_len or model.max_len, less prompt
  tuning's soft prompt (the model puts it before every row)."""
  max_len = config.model.max_len
  seq_len = config.train.get('seq_len', 0) or max_len
  if seq_len > max_len:
    raise ValueError(f'train.seq_len={seq_len} exceeds model.max_len={max_len}; lower it.')
  peft = config.get('peft')
  prompt = peft.num_virtual_tokens if peft is not None and peft.method == 'prompt' else 0
  if seq_len - prompt <= 0:
    raise ValueError(f'Rows of {seq_len} tokens leave no room after a soft prompt of '
                     f'{prompt}; lower peft.num_virtual_tokens.')
  return seq_len - prompt if seq_len + prompt > max_len else seq_len


def resolve(config: mlc.ConfigDict, tokenizer=None) -> mlc.ConfigDict:
  """Checks keys and fills derived fields (model.vocab_size 0 -> the tokenizer's)."""
  check_keys(config)
  config = config.copy_and_resolve_references()
  if config.model.vocab_size == 0:
    if tokenizer is None:
      tokenizer = build_tokenizer(config)
    with config.unlocked():
      config.model.vocab_size = tokenizer.vocab_size
  elif tokenizer is not None and tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f'The tokenizer has {tokenizer.vocab_size} symbols but model.vocab_size is '
        f'{config.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} '
        '(or 0 to take it from the tokenizer).')
  return config
