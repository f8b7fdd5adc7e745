#!/bin/bash
# One call on a lent GPU machine: what is there, a bf16 matmul's rate, then
# scripts/benchmark.py for gpt2_124m (bf16) with the attention the backend picks (cuDNN
# flash on GPU) and with XLA's, each a JSON line; results also under $OUT when set.
#   bash scripts/gpu_benchmark.sh [wheels_dir]   (wheels: packages the image lacks)
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -n "${1:-}" ]; then
  $PY -m pip install -q --no-deps --no-index --target /tmp/extra "$1"/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/extra:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
$PY - <<'EOF'
import time, jax, jax.numpy as jnp
n = 8192
a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in (0, 1))
f = jax.jit(lambda a, b: a @ b)
f(a, b).block_until_ready()
times = []
for _ in range(5):
  t = time.perf_counter(); [f(a, b) for _ in range(10)][-1].block_until_ready()
  times.append((time.perf_counter() - t) / 10)
print(f'bf16 matmul {n}^3: {2 * n**3 / sorted(times)[2] / 1e12:.0f} TFLOP/s (median of 5x10)')
EOF
run() {  # name, then benchmark.py flags
  local name=$1; shift
  timeout 240 $PY scripts/benchmark.py --config=configs/gpt2_124m.py \
    --config.runtime.dtype=bfloat16 "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(tail -2 "$OUT/$name.log" | tr '\n' ' ')"
}
run auto --steps=20
run xla --steps=20 --config.runtime.attention=xla
