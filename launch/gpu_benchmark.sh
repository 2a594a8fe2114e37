#!/usr/bin/env bash
# Measure the JAX pretraining step on one H100/H200: images/s, TFLOP/s and MFU of the full-size
# bfloat16 configuration at several per-device batch sizes, first on device-resident synthetic
# batches, then fed by the real Grain pipeline. Ends in under 8 minutes and writes its table.
#
# Usage:
#   launch/gpu_benchmark.sh TABLE_FILE [CORPUS_DIR]
#
# TABLE_FILE receives the text table; TABLE_FILE.json the full results; TABLE_FILE.log the log.
# CORPUS_DIR is a prepared corpus at 224 px (python -m vismae_jax.data.prepare --demo
# --output_dir=DIR prepares one on any CPU machine). Without it the demo corpus is prepared here
# when pydicom is importable, else the pipeline part is skipped.
#
# Environment (all optional):
#   PYTHON        interpreter with a CUDA jax, flax, optax and ml_collections (default python3)
#   WHEELS        folder of wheels installed offline into a private folder before the run
#                 (pip --no-index --no-deps --target), for packages the machine lacks
#   BATCH_SIZES   comma-separated per-device batch sizes (default 128,256,512)
#   WORKERS       Grain worker processes for the pipeline part (default 8)
#   REMAT         1 to recompute block activations in the backward pass (default 0)
#   TIME_LIMIT_S  hard limit of the Python run in seconds (default 450)
#   REQUIRE_GPU   0 to run on whatever backend JAX finds, for a dry run on a CPU (default 1)
#   EXTRA_ARGS    more benchmark.py flags, last so they win; a CPU dry run of the script:
#                 REQUIRE_GPU=0 EXTRA_ARGS="--resolution=64 --gpu_steps=1 --repeats=1" \
#                 BATCH_SIZES=2 WORKERS=1 PYTHON=.venv/bin/python launch/gpu_benchmark.sh FILE
#
# The script installs nothing from the network. On a machine without the project's pinned
# stack, install it first with: pip install -r requirements.txt "jax[cuda12]==0.10.2"
# (or "jax[cuda13]==0.10.2" for CUDA 13 drivers).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 TABLE_FILE [CORPUS_DIR]" >&2
  exit 2
fi
TABLE_FILE=$(realpath -m "$1")
CORPUS_DIR=${2:-}
PYTHON=${PYTHON:-python3}
BATCH_SIZES=${BATCH_SIZES:-128,256,512}
WORKERS=${WORKERS:-8}
REMAT=${REMAT:-0}
TIME_LIMIT_S=${TIME_LIMIT_S:-450}
REQUIRE_GPU=${REQUIRE_GPU:-1}
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"

cd "$(dirname "$0")/.."
mkdir -p "$(dirname "$TABLE_FILE")"
LOG_FILE="$TABLE_FILE.log"
: >"$LOG_FILE"

log() { echo "$*" | tee -a "$LOG_FILE"; }

# 1. The card as found (read-only queries; its settings are left alone).
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw \
    --format=csv 2>&1 | tee -a "$LOG_FILE"
else
  log "nvidia-smi not found; continuing with what JAX reports."
fi

# 2. Packages the machine lacks, from local wheels only.
if [[ -n "${WHEELS:-}" ]]; then
  SITE=$(mktemp -d /tmp/vismae_site.XXXXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  log "Installed the wheels of $WHEELS into $SITE."
fi

# 3. What can run here: the train step needs a GPU backend and ml_collections; the pipeline
#    part needs grain, and preparing the demo corpus needs pydicom.
if ! REQUIRE_GPU=$REQUIRE_GPU "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG_FILE"
import os
import jax, flax, optax, ml_collections
print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
      f"backend {jax.default_backend()}, devices {jax.devices()}")
if os.environ["REQUIRE_GPU"] == "1":
    assert jax.default_backend() == "gpu", "JAX found no GPU: install a CUDA jaxlib (see above)."
EOF
then
  log "The train step cannot run here (see the error above)."
  exit 1
fi

PARTS=train
if "$PYTHON" -c "import grain, array_record" 2>/dev/null; then
  if [[ -n "$CORPUS_DIR" ]] || "$PYTHON" -c "from vismae_jax.data import demo, prepare
demo.demo_paths()" 2>/dev/null; then
    PARTS=train,pipeline
  else
    log "No CORPUS_DIR, and the demo corpus cannot be prepared here: the pipeline part is skipped."
  fi
else
  log "grain or array_record missing: the pipeline part is skipped (carry them in WHEELS)."
fi

# 4. The measurement. A compilation cache in the repository speeds up a second run.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax_gpu}
export PYTHONUNBUFFERED=1
REMAT_FLAG=--noremat
[[ "$REMAT" == 1 ]] && REMAT_FLAG=--remat
CORPUS_FLAG=()
[[ -n "$CORPUS_DIR" ]] && CORPUS_FLAG=(--corpus_dir="$(realpath "$CORPUS_DIR")")

log "Running parts=$PARTS batch_sizes=$BATCH_SIZES workers=$WORKERS remat=$REMAT."
set +e
timeout "$TIME_LIMIT_S" "$PYTHON" launch/benchmark.py \
  --suite=gpu \
  --parts="$PARTS" \
  --batch_sizes="$BATCH_SIZES" \
  --workers="$WORKERS" \
  --repeats=3 \
  --gpu_steps=20 \
  --time_budget_s=$((TIME_LIMIT_S * 2 / 3)) \
  "$REMAT_FLAG" \
  "${CORPUS_FLAG[@]}" \
  --json="$TABLE_FILE.json" \
  --table="$TABLE_FILE" \
  "${EXTRA[@]}" 2>&1 | tee -a "$LOG_FILE"
status=${PIPESTATUS[0]}
set -e

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv 2>&1 | tee -a "$LOG_FILE"
fi
if [[ $status -ne 0 ]]; then
  log "benchmark.py exited with status $status (124 = over TIME_LIMIT_S=$TIME_LIMIT_S)."
  exit "$status"
fi
log "Table written to $TABLE_FILE."
