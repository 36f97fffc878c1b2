#!/usr/bin/env bash
# Run `flowrl-jax train` on every worker of a Cloud TPU pod slice (e.g. v5p-64: 8 hosts).
#
#   TPU_NAME=my-v5p ZONE=us-east5-a ./launch/tpu_pod.sh \
#       --config configs/qwen2.5-7b-math.yaml --out gs://my-bucket/runs/q7-flowrl
#
# Every worker gets the same command; JAX discovers the other hosts by itself (TPU
# multi-host auto-detection; flowrl-jax calls jax.distributed.initialize() when it sees
# more than one worker). Use a gs:// --out so all hosts write one checkpoint directory;
# rerunning the same command resumes from the newest complete checkpoint.
# Env: TPU_NAME, ZONE (required); PROJECT; REPO (git URL, default: rsync this checkout);
#      SETUP=0 skips the install step on re-launches.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
SRC_DIR=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=flowrl-jax
ARGS=$(printf '%q ' "$@")
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="$1"
}
if [ "${SETUP:-1}" = "1" ]; then
  if [ -n "${REPO:-}" ]; then
    ssh_all "rm -rf $REMOTE_DIR && git clone --depth 1 $REPO $REMOTE_DIR"
  else
    tar -C "$SRC_DIR" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/flowrl-jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/flowrl-jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/flowrl-jax.tgz"
  fi
  ssh_all "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip \
    && .venv/bin/pip install -q -e '.[tpu]'"
fi
# One log per worker on its own disk; stdout of worker 0 shows the progress table.
ssh_all "cd $REMOTE_DIR && .venv/bin/flowrl-jax train $ARGS 2>&1 | tee -a train-\$(hostname).log"
