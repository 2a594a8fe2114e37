#!/usr/bin/env bash
# Pretrain the full Swin MAE on the demo corpus, then export the weights to PyTorch.
#
#   launch/demo.sh [WORKDIR]     (default WORKDIR: /tmp/vismae_demo)
#
# Step 1 prepares the demo corpus (the DICOM, PNG and JPEG files that ship with pydicom and
# pydicom-data) into WORKDIR/corpus, once. Step 2 trains the `demo` config: it writes
# checkpoints, TensorBoard events and reconstruction PNGs under WORKDIR. Rerunning this script
# after an interruption resumes from the newest checkpoint. Step 3 writes WORKDIR/export/.
# Extra arguments after WORKDIR go to the pretraining command, e.g.
#   launch/demo.sh /tmp/vismae_demo --config.train.num_steps=120
set -euo pipefail

WORKDIR="${1:-/tmp/vismae_demo}"
shift || true
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

if [[ ! -f "${WORKDIR}/corpus/summary.json" ]]; then
  echo "Preparing the demo corpus in ${WORKDIR}/corpus"
  "${PYTHON}" -m vismae_jax.data.prepare --demo --output_dir="${WORKDIR}/corpus" --image_size=224
fi

# Ctrl-C or SIGTERM makes pretraining save a checkpoint and exit 0. The trap records the signal,
# so the script then stops instead of exporting a partly trained model.
interrupted=""
trap 'interrupted=1' INT TERM

echo "Pretraining (config demo) in ${WORKDIR}"
"${PYTHON}" -m vismae_jax.pretrain \
  --config=configs/pretrain.py:demo \
  --workdir="${WORKDIR}" \
  --compilation_cache_dir="${WORKDIR}/jax_cache" \
  --alsologtostderr \
  "$@"

if [[ -n "${interrupted}" ]]; then
  echo "Interrupted: the checkpoint is saved. Rerun the same command to resume."
  exit 130
fi

if [[ -f vismae_jax/export/__main__.py ]]; then
  echo "Exporting PyTorch weights to ${WORKDIR}/export"
  "${PYTHON}" -m vismae_jax.export --workdir="${WORKDIR}"
fi
