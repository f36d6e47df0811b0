#!/bin/bash
# The device-side script of this run (one H100, PyTorch preinstalled, no package registry).
# usage: bash run_device.sh "GROUP_A_METHODS" "GROUP_B_METHODS" BUDGET_S   (with .whl/ carried:
#   the grpcio/protobuf cp312 wheels from `pip download` and the pinned LIFL in .whl/lifl_head)
# Runs group A; then group B in the same call only if the time left is enough for it
# (estimated from group A's wall time), otherwise leaves it for the next call.
# Results (job_*.json, config.json, log) are tarred into $OUT per group.
set -u
A=$1; B=$2; BUDGET=$3
T0=$(date +%s)
# LIFL's wire needs grpcio>=1.81.1 and protobuf>=6.33.5: carried as wheels in .whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# LIFL pinned to a commit (here: mkdir -p .whl/lifl_head && git archive be244e8 lifl setup.py | tar -x -C .whl/lifl_head),
# so concurrent uncommitted edits of lifl/ do not enter the run; build its C fold kernel there
(cd .whl/lifl_head && python3 setup.py -q build_ext --inplace 2>&1 | tail -2)
# PYTHONSAFEPATH=1: `python -m` must not put the working directory (whose lifl/ may hold others'
# uncommitted edits) ahead of PYTHONPATH; it is inherited by the bench's worker processes
export PYTHONPATH=/tmp/site:$PWD/.whl/lifl_head:$PWD PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
{ python3 -V; nproc; free -g; nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
  python3 -c "import grpc, google.protobuf, numpy, prometheus_client, ml_dtypes, h5py, matplotlib, torch, lifl, lifl.fold
print('grpc', grpc.__version__, 'protobuf', google.protobuf.__version__, 'numpy', numpy.__version__, 'ml_dtypes', ml_dtypes.__version__, 'h5py', h5py.__version__, 'mpl', matplotlib.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))
print('lifl from', lifl.__file__)
import heteroswitch; print('heteroswitch from', heteroswitch.__file__)
assert '.whl/lifl_head' in lifl.__file__, 'not the pinned LIFL'
import lifl._foldc; print('lifl._foldc C kernel:', lifl._foldc.__file__)"
} 2>&1 | tee $OUT/env.txt
[ ${PIPESTATUS[0]} -eq 0 ] || { echo "environment check failed"; exit 1; }
(while true; do echo "$(( $(date +%s) - T0 ))s mem_used_MiB/total $(free -m | awk '/Mem/{print $3"/"$2}') gpu $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"; sleep 10; done) > $OUT/mon.txt 2>&1 &
MON=$!
run_group() {  # $1 methods, $2 tag, $3 timeout
  local D=/tmp/hsv3_$2
  local t=$(date +%s)
  timeout $3 python3 -m heteroswitch bench --preset gpu --seeds 0,1,2 --methods $1 --rounds 50 \
      --clients-per-round 8 --workers 6 --aggregator lifl --device cuda --out $D 2>&1 | tee $OUT/log_$2.txt
  echo "group $2 ($1): rc=${PIPESTATUS[0]} wall $(( $(date +%s) - t ))s" | tee -a $OUT/log_$2.txt
  (cd $D && tar czf $OUT/jobs_$2.tgz config.json $(ls job_*.json 2>/dev/null) $(ls results.json table.md *.png 2>/dev/null))
}
TA=$(date +%s)
run_group "$A" A $(( BUDGET - 20 ))
WA=$(( $(date +%s) - TA ))
LEFT=$(( BUDGET - ($(date +%s) - T0) ))
NEED=$(( WA * 14 / 10 + 20 ))
echo "group A wall ${WA}s; left ${LEFT}s; group B needs about ${NEED}s"
if [ -n "$B" ] && [ $LEFT -gt $NEED ]; then run_group "$B" B $(( LEFT - 15 )); else echo "group B not started"; fi
kill $MON
echo "total $(( $(date +%s) - T0 ))s"
