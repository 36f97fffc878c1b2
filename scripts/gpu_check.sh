#!/usr/bin/env bash
# One pass of the accelerator checks on a single NVIDIA GPU (run from the repository root).
# The default stages measure the sampler's decode: tokens/s and the HBM-roofline fraction
# (bytes read per decode step: weights + the KV cache in use, over the GPU's peak HBM
# bandwidth) at batch 64 and 256 for the 0.5B shape (beside HF `generate`) and the 7B shape
# (no HF side: its host-side fp32 build takes minutes). The whole pass stays under 8 minutes:
# each stage has its own limit, cut to what is left of BUDGET_S, and a stage that would get
# under 20 s is skipped. Other stages by name:
#   STAGES="env attention train" bash scripts/gpu_check.sh   # attention kernels, train MFU
# RUN_TESTS=1 appends the numerical test subset. Each stage logs to $OUT/NAME.log (default
# runs/gpu_check) and echoes its progress lines; DRY_RUN=1 prints each stage's limit and
# command and runs nothing (tests/test_gpu_check.py). Uses the machine's installed
# jax/flax/torch: nothing is installed (lent GPU machines have no network).
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
CLI="$PY -m flowrl_jax.cli"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-470}  # the whole pass, seconds (8 minutes less a margin)
DRY_RUN=${DRY_RUN:-0}
STAGES=${STAGES:-env decode_small decode_large}
# the shapes (override for a smoke run on CPU)
ATTENTION_ARGS=${ATTENTION_ARGS:---batch 4 --seq 4096}
TRAIN_ARGS=${TRAIN_ARGS:---shapes qwen2.5-1.5b --seq 4096 --batch-large 4 --steps 5}
SAMPLE_ARGS=${SAMPLE_ARGS:---shapes qwen2.5-0.5b --batches 64,256 --prompt-len 64 --new-tokens 128 --repeats 2}
# a 7B decode step reads ≈ 15 GB, well above the per-kernel latency floor of 28 layers: the
# shape where the HBM roofline is meaningful
SAMPLE_LARGE_ARGS=${SAMPLE_LARGE_ARGS:---shapes qwen2.5-7b --batches 64,256 --prompt-len 64 --new-tokens 128 --repeats 2 --no-reference}
RUN_TESTS=${RUN_TESTS:-0}  # 1: also the numerical tests on the GPU (17 passed on an H200, 2026-11-26)
TEST_PLATFORM=${TEST_PLATFORM:-cuda}
[ "$RUN_TESTS" = 1 ] && STAGES="$STAGES tests"

elapsed() { echo $(( $(date +%s) - T0 )); }

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit (cut to the budget left), log to
  # $OUT/NAME.log, echo its progress lines ("[...") as they come
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - $(elapsed) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "--- $name skipped: ${left}s of the ${BUDGET_S}s budget left"
    return 0
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY $name $limit: $*"
    return 0
  fi
  echo "=== $name (limit ${limit}s, t=$(elapsed)s)"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep --line-buffered '^\['
  echo "--- $name rc=${PIPESTATUS[0]} t=$(elapsed)s"
  grep -v '^{' "$OUT/$name.log" | grep -v '^\[' | tail -n 6
}

for s in $STAGES; do
  case $s in
    env)
      stage env 25 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
  $PY -c 'import jax, flax, optax, orbax.checkpoint as oc, transformers, torch, numpy;
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__,
      \"transformers\", transformers.__version__, \"torch\", torch.__version__, \"numpy\", numpy.__version__);
print(jax.devices(), jax.default_backend())'" ;;
    # decode tokens/s and HBM-roofline fraction at batch 64 and 256 (HF generate beside it)
    decode_small)
      stage decode_small 210 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $CLI bench sample $SAMPLE_ARGS --json \
        --out "$OUT/decode_small.jsonl" ;;
    decode_large)
      stage decode_large 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 $CLI bench sample $SAMPLE_LARGE_ARGS --json \
        --out "$OUT/decode_large.jsonl" ;;
    # attention kernels at the train shape; the fastest one with bf16-level error drives bench train
    attention)
      stage attention 45 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 $CLI bench attention $ATTENTION_ARGS --json \
        --out "$OUT/attention.jsonl" ;;
    train)
      ATTN=xla
      [ "$DRY_RUN" = 1 ] || ATTN=$($PY - "$OUT/attention.jsonl" <<'PY'
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
        --attention "$ATTN" --json --out "$OUT/train.jsonl" ;;
    # the numerical tests on the GPU (the 8-device sharding tests need 8 devices: deselected);
    # GPU compiles of many tiny programs are slow (≈ 5 s each): what fits, runs
    tests)
      stage tests 90 env JAX_PLATFORMS=$TEST_PLATFORM XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $PY -m pytest -q -p no:cacheprovider \
        -k "not shard and not mesh" tests/test_model_parity.py tests/test_fused_attention.py \
        tests/test_train_step.py tests/test_optimizer.py tests/test_sampling_engine.py ;;
    *) echo "unknown stage '$s' (env decode_small decode_large attention train tests)"; exit 2 ;;
  esac
done

[ "$DRY_RUN" = 1 ] && exit 0
echo "=== summary (t=$(elapsed)s)"
cat "$OUT"/*.jsonl 2>/dev/null | $PY -c '
import json, sys
keep = ("bench", "kernel", "shape", "batch", "ours", "reference", "ratio", "mfu", "reference_mfu",
        "frac_hbm_roofline", "rel_err_out", "rel_err_grad", "attention", "ours_compile_s", "error")
for line in sys.stdin:
    r = json.loads(line)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keep})'
