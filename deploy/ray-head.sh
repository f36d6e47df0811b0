#!/bin/bash
# Head container of a KubeRay RayCluster: start the Ray head, wait for the worker pods, then
# `exec lifl serve --runtime ray --address auto` (it stays the container's main process).
#
# The RayCluster carries `ray.io/overwrite-container-cmd: "true"`, so KubeRay leaves this
# command alone and hands its generated `ray start ... --block` in $KUBERAY_GEN_RAY_START_CMD;
# it runs here without --block. LIFL's Ray runtime takes the nodes that are alive when it
# starts, so this waits for LIFL_RAY_NODES nodes (head included), at most LIFL_RAY_WAIT_S.
set -euo pipefail
ulimit -n 65536 2>/dev/null || true
start_cmd="${KUBERAY_GEN_RAY_START_CMD:?KUBERAY_GEN_RAY_START_CMD is empty: is the RayCluster annotated ray.io/overwrite-container-cmd=true?}"
eval "${start_cmd//--block/}"
want="${LIFL_RAY_NODES:-1}"
deadline=$((SECONDS + ${LIFL_RAY_WAIT_S:-300}))
until have=$(python -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null) \
      && [ "${have}" -ge "${want}" ]; do
    if [ "${SECONDS}" -ge "${deadline}" ]; then
        echo "lifl-ray-head: ${have:-0} of ${want} Ray nodes after ${LIFL_RAY_WAIT_S:-300} s; starting with those" >&2
        break
    fi
    sleep 2
done
exec lifl serve --config config/lifl.toml --runtime ray --address auto "$@"
