#!/bin/bash
# Train on a Cloud TPU pod slice: the same command on every worker, started from your machine.
#
#   tools/launch/tpu_pod.sh TPU_NAME ZONE configs/tulu.py [--config.KEY=VALUE ...]
#
# Each TPU VM host runs one jsft.train process; JAX reads the workers from the TPU metadata
# (jsft.train calls jax.distributed.initialize() on a multi-host slice). The repository must be
# installed on every worker (pip install -e . in the same path), the data cache built once
# (python -m jsft.cli.prepare) into a gs:// data.cache_dir, and output_dir a gs:// folder.
# Size the mesh before paying for the slice (compiles with the TPU compiler on any machine):
#   pip install 'jsft[tpu]' && python -m jsft.cli.plan --config=configs/tulu.py --topology=v5p-64
# jsft.train adds its TPU compiler flags to LIBTPU_INIT_ARGS (jsft/runtime.py: collective matmul on v5p
# and v6e, continuation fusion on v5e), chosen by TPU_ACCELERATOR_TYPE, which this script reads from the
# TPU's description and sends; LIBTPU_INIT_ARGS set here is sent to every worker and wins for the flags
# it names (JSFT_LIBTPU_DEFAULTS=0: none of jsft's).
set -euo pipefail
TPU_NAME=${1:?usage: tools/launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.KEY=VALUE ...]}
ZONE=${2:?zone, e.g. us-east5-a}
CONFIG=${3:?config file, e.g. configs/tulu.py}
shift 3
REPO=${JSFT_REPO:-\$HOME/jsft}
printf -v ARGS '%q ' "$@"
ACCELERATOR=${TPU_ACCELERATOR_TYPE:-$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
  --format='value(acceleratorType)' || true)}  # "v5litepod-64", "v5p-128"
printf -v ENVS 'LIBTPU_INIT_ARGS=%q JSFT_LIBTPU_DEFAULTS=%q' "${LIBTPU_INIT_ARGS:-}" "${JSFT_LIBTPU_DEFAULTS:-1}"
if [[ -n "$ACCELERATOR" ]]; then  # unknown: jsft's flags for no particular generation
  printf -v ENVS '%s TPU_ACCELERATOR_TYPE=%q' "$ENVS" "$ACCELERATOR"
fi
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd $REPO && $ENVS python -m jsft.train --config=$CONFIG --config.model.attention=splash $ARGS"
