#!/usr/bin/env bash
# HeteroSwitch on the trade-off benchmark (GPU).  Usage:
#   bash benchmarks/heteroswitch_tradeoff.sh calibrate OUTDIR   # seed 100 only, tradeoff-easy: baselines + switch variants
#   bash benchmarks/heteroswitch_tradeoff.sh difficulty OUTDIR T1,T2 TC SCENE...  # seed 100: scene variants
#   bash benchmarks/heteroswitch_tradeoff.sh recalibrate OUTDIR TC SCENE T1,T2 ...  # switch variants, chosen on seed 100
#   bash benchmarks/heteroswitch_tradeoff.sh confirm OUTDIR T1,T2 TC [SCENE]   # reported seeds 0,1,2, five methods, via LIFL
# Every bench shares: --preset gpu --benchmark tradeoff --rounds $ROUNDS --clients-per-round 8 --device cuda.
set -u
MODE=$1; OUT=$2; ROUNDS=${ROUNDS:-40}; LIMIT=${LIMIT:-540}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 HS_THREADS=1
COMMON="--preset gpu --benchmark tradeoff --rounds $ROUNDS --clients-per-round 8 --device cuda"
mkdir -p "$OUT"
if [ "$MODE" = calibrate ]; then
  # the declared switch variants: "T1,T2 TC" (TC "-" = no per-client choice: the revision-2 switch)
  VARIANTS=("-0.15,0.5 -" "-0.15,0.5 0.3" "-0.15,0.5 0.1" "0.0,0.5 0.2" "-0.3,0.5 0.2" "0.0,0.3 0.1")
  COMMON="${COMMON/--benchmark tradeoff/--benchmark tradeoff-easy}"  # the first calibration ran on the 4-pair variant
  timeout $LIMIT python3 -m heteroswitch bench $COMMON --seeds 100 --methods fedavg,isp,swad,isp_swad \
      --workers 4 --aggregator local --out "$OUT/base" > "$OUT/base.log" 2>&1 &
  i=0
  for v in "${VARIANTS[@]}"; do
    set -- $v
    extra="--colour-threshold off"; [ "$2" != "-" ] && extra="--colour-threshold $2"
    timeout $LIMIT python3 -m heteroswitch bench $COMMON --seeds 100 --methods heteroswitch --thresholds="$1" $extra \
        --workers 1 --aggregator local --out "$OUT/hs$i" > "$OUT/hs$i.log" 2>&1 &
    echo "hs$i: thresholds $1 colour $2" >> "$OUT/variants.txt"
    i=$((i+1))
  done
  wait
elif [ "$MODE" = difficulty ]; then
  # validation seed 100: all five methods (switch at the thresholds calibrated by "calibrate") per scene variant
  COMMON="${COMMON/--benchmark tradeoff/--benchmark tradeoff-easy}"  # scene variants were written on that base
  i=0
  for sc in "${@:5}"; do
    timeout $LIMIT python3 -m heteroswitch bench $COMMON --seeds 100 --methods fedavg,isp,swad,isp_swad,heteroswitch \
        --scene "$sc" --thresholds="$3" --colour-threshold "$4" --workers ${WORKERS:-3} --aggregator local --out "$OUT/d$i" \
        > "$OUT/d$i.log" 2>&1 &
    echo "d$i: $sc" >> "$OUT/variants.txt"
    i=$((i+1))
  done
  wait
elif [ "$MODE" = recalibrate ]; then
  # switch variants "T1,T2" (colour threshold $3) on the validation seed 100 AND seeds 0,1,2 at once; the variant
  # is then chosen on seed 100 alone (select_variant.py: the higher tail mean AP + worst AP over seen devices)
  SCENE=$4; i=0
  for t in "${@:5}"; do
    timeout $LIMIT python3 -m heteroswitch bench $COMMON --seeds 100,0,1,2 --methods heteroswitch --scene "$SCENE" \
        --thresholds="$t" --colour-threshold "$3" --workers 4 --aggregator local --out "$OUT/v$i" > "$OUT/v$i.log" 2>&1 &
    echo "v$i: thresholds $t colour $3" >> "$OUT/variants.txt"
    i=$((i+1))
  done
  wait
  python3 benchmarks/heteroswitch_select_variant.py "$OUT" 100 | tee "$OUT/selection.txt"
elif [ "$MODE" = confirm ]; then
  timeout $LIMIT python3 -m heteroswitch bench $COMMON --seeds 0,1,2 --methods fedavg,isp,swad,isp_swad,heteroswitch \
      --thresholds="$3" --colour-threshold "$4" ${5:+--scene "$5"} --workers ${WORKERS:-8} --aggregator ${AGG:-lifl} --out "$OUT/confirm" \
      > "$OUT/confirm.log" 2>&1
else
  echo "usage: $0 calibrate|difficulty|confirm OUTDIR [T1,T2 TC [SCENE...]]" >&2; exit 2
fi
