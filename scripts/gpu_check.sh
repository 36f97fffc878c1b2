#!/usr/bin/env bash
# One pass of the accelerator checks on a single NVIDIA GPU (run from the repository root;
# about 9.5 minutes at most, the stage limits below, sized from the 2026-11-26 H200 run;
# RUN_TESTS=1 adds 1.5 minutes):
# the jax[cuda] environment, the attention kernels, the train-step MFU (Qwen2.5-1.5B,
# seq 4096) and the decode HBM-roofline fraction at batch 64, then a GPU run of the numerical
# test subset. Every stage has its own time limit and log under $OUT (default runs/gpu_check),
# so a failing stage costs only its own minutes. Uses the machine's installed jax/flax/torch:
# nothing is installed (lent GPU machines have no network).
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
CLI="$PY -m flowrl_jax.cli"
T0=$(date +%s)
# the shapes (override for a smoke run on CPU)
ATTENTION_ARGS=${ATTENTION_ARGS:---batch 4 --seq 4096}
TRAIN_ARGS=${TRAIN_ARGS:---shapes qwen2.5-1.5b --seq 4096 --batch-large 4 --steps 5}
SAMPLE_ARGS=${SAMPLE_ARGS:---shapes qwen2.5-0.5b --batches 64 --prompt-len 64 --new-tokens 128 --repeats 2}
# a 7B decode step reads ≈ 15 GB, well above the per-kernel latency floor of 28 layers: the
# shape where the HBM roofline is meaningful (no HF side: its host-side fp32 build takes minutes)
SAMPLE_LARGE_ARGS=${SAMPLE_LARGE_ARGS:---shapes qwen2.5-7b --batches 64 --prompt-len 64 --new-tokens 128 --repeats 2 --no-reference}
RUN_TESTS=${RUN_TESTS:-0}  # 1: also the numerical tests on the GPU (17 passed on an H200, 2026-11-26)
TEST_PLATFORM=${TEST_PLATFORM:-cuda}

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, t=$(( $(date +%s) - T0 ))s)"
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "--- $name rc=$? t=$(( $(date +%s) - T0 ))s"
  grep -v '^{' "$OUT/$name.log" | tail -n 6
}

stage env 25 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
  $PY -c 'import jax, flax, optax, orbax.checkpoint as oc, transformers, torch, numpy;
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__,
      \"transformers\", transformers.__version__, \"torch\", torch.__version__, \"numpy\", numpy.__version__);
print(jax.devices(), jax.default_backend())'"

# attention kernels at the train shape; the fastest one with bf16-level error drives bench train
stage attention 45 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 $CLI bench attention $ATTENTION_ARGS --json \
  --out "$OUT/attention.jsonl"
ATTN=$($PY - "$OUT/attention.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    rows = []
ok = [r for r in rows if r.get("ours") and r.get("finite") and r["rel_err_out"] < 3e-2
      and r["rel_err_grad"] < 5e-2]
print(min(ok, key=lambda r: r["ours"])["kernel"] if ok else "xla")
PY
)
echo "attention for bench train: $ATTN"

stage train 180 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 $CLI bench train $TRAIN_ARGS \
  --attention "$ATTN" --json --out "$OUT/train.jsonl"

stage sample 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $CLI bench sample $SAMPLE_ARGS --json --out "$OUT/sample.jsonl"

stage sample_large 120 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $CLI bench sample $SAMPLE_LARGE_ARGS --json \
  --out "$OUT/sample_large.jsonl"

# the numerical tests on the GPU (the 8-device sharding tests need 8 devices: deselected);
# last, since GPU compiles of many tiny programs are slow (≈ 5 s each): what fits, runs
[ "$RUN_TESTS" = 1 ] && stage tests 90 env JAX_PLATFORMS=$TEST_PLATFORM XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $PY -m pytest -q -p no:cacheprovider \
  -k "not shard and not mesh" tests/test_model_parity.py tests/test_fused_attention.py \
  tests/test_train_step.py tests/test_optimizer.py tests/test_sampling_engine.py

echo "=== summary (t=$(( $(date +%s) - T0 ))s)"
cat "$OUT"/*.jsonl 2>/dev/null | $PY -c '
import json, sys
keep = ("bench", "kernel", "shape", "batch", "ours", "reference", "ratio", "mfu", "reference_mfu",
        "frac_hbm_roofline", "rel_err_out", "rel_err_grad", "attention", "ours_compile_s", "error")
for line in sys.stdin:
    r = json.loads(line)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keep})'
