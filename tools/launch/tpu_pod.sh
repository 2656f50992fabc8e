#!/bin/bash
# Train on a Cloud TPU pod slice: the same command on every worker, started from your machine.
#
#   tools/launch/tpu_pod.sh TPU_NAME ZONE configs/tulu.py [--config.KEY=VALUE ...]
#
# Each TPU VM host runs one jsft.train process; JAX reads the workers from the TPU metadata
# (jsft.train calls jax.distributed.initialize() on a multi-host slice). The repository must be
# installed on every worker (pip install -e . in the same path), the data cache built once
# (python -m jsft.prepare) into a gs:// data.cache_dir, and output_dir a gs:// folder.
# Size the mesh before paying for the slice (compiles with the TPU compiler on any machine):
#   pip install 'jsft[tpu]' && python -m jsft.plan --config=configs/tulu.py --topology=v5p-64
set -euo pipefail
TPU_NAME=${1:?usage: tools/launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.KEY=VALUE ...]}
ZONE=${2:?zone, e.g. us-east5-a}
CONFIG=${3:?config file, e.g. configs/tulu.py}
shift 3
REPO=${JSFT_REPO:-\$HOME/jsft}
printf -v ARGS '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd $REPO && python -m jsft.train --config=$CONFIG --config.model.attention=splash $ARGS"
