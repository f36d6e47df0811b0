#!/usr/bin/env bash
# Issue 17's 16-core figures (gateway pool, fold scaling), as run on the H200 host:
#   bash benchmarks/pool_16core.sh OUTDIR
# servers pinned to cores 0-7, client processes to 8-15.
set -u
out=${1:-bench-out/pool16}; mkdir -p "$out"
py=${PYTHON:-python3}
q() { grep -v '\.\. \|lifl.transport'; }
$py -m benchmarks.bench_fold --processes 1,2,4,8,16 --reps 5 --out "$out/fold-scaling.json" 2>&1 | q | tail -20
$py -m benchmarks.bench_ingest_pool --processes 8 --clients 16 --conns 4 --pushes 32 --server-cpus 0-7 \
    --client-cpus 8-15 --reps 5 --variant 'nocheck={"reject_nonfinite": false}' \
    --variant 'bdpoff={"grpc_bdp_probe": false}' --out "$out/ingest-pool.json" 2>&1 | q | tail -24
$py -m benchmarks.bench_ingest_pool --processes 8 --clients 16 --conns 4 --pushes 32 --server-cpus 0-7 \
    --client-cpus 8-15 --reps 5 --chunk-mib 4 --out "$out/ingest-pool-chunk4.json" 2>&1 | q | tail -20
timeout 300 $py -m benchmarks.bench_ingest_pool --model resnet18 --processes 8 --clients 16 --conns 2 --pushes 63 \
    --e2e --server-cpus 0-7 --client-cpus 8-15 --reps 3 --shm-budget-mb 4096 --out "$out/e2e-resnet18-1008.json" 2>&1 | q | tail -20
ls /dev/shm
