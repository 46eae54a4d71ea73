#!/usr/bin/env bash
# Train inside the megatronlite container on a Slurm cluster with pyxis/enroot: each job step runs in
# the image (srun --container-image), with the working and run directories mounted at the same paths
# (set MOUNTS=src:dst,... for more, e.g. a dataset directory). Build and import the image once:
#   docker build -f docker/Dockerfile -t megatronlite . && enroot import -o megatronlite.sqsh dockerd://megatronlite
# then, from the directory that holds your configs (edit the defaults below to your cluster):
#   IMAGE=$PWD/megatronlite.sqsh launch/submit_pyxis.sh configs/models/llama-1b.yaml --set train.steps=20000
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [megatronlite submit options...]}
shift
IMAGE=${IMAGE:?set IMAGE to the megatronlite image: a .sqsh from enroot import, or registry#image:tag}
extra=()
[[ -n ${MOUNTS:-} ]] && extra+=(--container-mounts "$MOUNTS")
exec megatronlite submit "$CONFIG" \
    --nodes "${NODES:-2}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --partition "${PARTITION:-gpu}" --time "${TIME:-24:00:00}" \
    --container-image "$IMAGE" "${extra[@]}" "$@"
