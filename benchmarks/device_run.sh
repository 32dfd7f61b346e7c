#!/bin/bash
# One device call: build the peers in the background, run the GPU tests, then the benchmarks.
# Usage on the GPU machine, from the repository root: bash benchmarks/device_run.sh STEP...
# (steps: tests, scan, scan-sweep, conv, gen). Writes logs and JSON under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total,temperature.gpu --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
( source .peers/build-on-device.sh > "$OUT/peers.log" 2>&1; echo "peers rc=$?" >> "$OUT/peers.log" ) &
peers_pid=$!
for step in "$@"; do
  case $step in
    tests)
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    *)
      wait $peers_pid 2>/dev/null; tail -2 "$OUT/peers.log"
      export PYTHONPATH=/tmp/peers-site:$PYTHONPATH
      case $step in
        scan) timeout 300 python3 benchmarks/selective_scan_gpu.py --out "$OUT/gpu_selective_scan.json" 2>&1 | tee "$OUT/bench_scan.log" | grep -v Warn ;;
        scan-sweep) timeout ${SCAN_TIMEOUT:-150} python3 benchmarks/selective_scan_gpu.py --sweep --out "$OUT/gpu_selective_scan.json" 2>&1 | tee "$OUT/bench_scan.log" | grep -v Warn ;;
        *) [ -f "benchmarks/$step.py" ] && timeout ${GEN_TIMEOUT:-200} python3 "benchmarks/$step.py" --reps 2 --out "$OUT/gpu_$step.json" 2>&1 | tee "$OUT/bench_$step.log" ;;
      esac ;;
  esac
done
wait
