#!/bin/bash
# One device call: build the peers in the background, run the GPU tests, then the benchmarks.
# Usage on the GPU machine, from the repository root: bash benchmarks/device_run.sh STEP...
# (steps: tests, scan, scan-sweep, generation, profile, decode, ops). Writes logs and JSON under $OUT.
# Session 2 timings on an H100 (serial): generation ~110 s, scan-sweep 250-300 s, all GPU tests
# > 400 s; compiling the kernels is most of both. The sweep now compiles its configurations in
# parallel processes first and the tests run under pytest-xdist; TESTS=... picks test files.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total,temperature.gpu --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
# A mamba_ssm build saved by an earlier call (.peers/mamba_built.tgz) skips the 2.5-minute build.
mkdir -p /tmp/peers-site
ls .peers/mamba_built.tgz.part* >/dev/null 2>&1 && cat .peers/mamba_built.tgz.part* > /tmp/mamba_built.tgz && tar xzf /tmp/mamba_built.tgz -C /tmp/peers-site
( source .peers/build-on-device.sh > "$OUT/peers.log" 2>&1; echo "peers rc=$?" >> "$OUT/peers.log"
  # (files come back at most 16 MiB each: the build travels in parts)
  ls .peers/mamba_built.tgz.part* >/dev/null 2>&1 || (cd /tmp/peers-site && tar czf /tmp/mb.tgz mamba_ssm selective_scan_cuda*.so mamba_ssm-*info 2>/dev/null && split -b 15m /tmp/mb.tgz "$OUT/mamba_built.tgz.part"; ls -la "$OUT" >> "$OUT/peers.log") ) &
peers_pid=$!
for step in "$@"; do
  case $step in
    tests)
      # -rf --tb=short: a failure's message survives a tail; --durations: which tests need time
      # pytest-xdist is in the GPU image: workers compile the kernels in parallel (compiling is
      # most of the time of these tests); pytest-timeout stops one stuck test, not the call.
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -v -rf --tb=short --durations=15 -m gpu \
        -n ${TEST_WORKERS:-6} --timeout ${TEST_TIMEOUT:-280} \
        ${TESTS:-tests/gpu} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E 'PASS|FAIL|ERROR|passed|failed' | tail -60 ;;
    *)
      wait $peers_pid 2>/dev/null; tail -2 "$OUT/peers.log"
      export PYTHONPATH=/tmp/peers-site:$PYTHONPATH
      case $step in
        scan) timeout ${SCAN_TIMEOUT:-300} python3 benchmarks/selective_scan_gpu.py $SCAN_ARGS --out "$OUT/gpu_selective_scan.json" 2>&1 | tee "$OUT/bench_scan.log" | grep -v Warn ;;
        scan-sweep) timeout ${SCAN_TIMEOUT:-300} python3 benchmarks/selective_scan_gpu.py --sweep --split-sweep --prefill $SCAN_ARGS --out "$OUT/gpu_selective_scan.json" 2>&1 | tee "$OUT/bench_scan.log" | grep -v Warn ;;
        profile) timeout ${PROF_TIMEOUT:-150} python3 benchmarks/profile_generation.py $PROF_ARGS --out "$OUT/gpu_profile.json" 2>&1 | tee "$OUT/bench_profile.log" ;;
        decode) timeout ${DECODE_TIMEOUT:-200} python3 benchmarks/decode_gpu.py $DECODE_ARGS --out "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/bench_decode.log" ;;
        ops) timeout ${OPS_TIMEOUT:-200} python3 benchmarks/ops.py --device cuda --dtype bf16 --out "$OUT/gpu_ops.json" 2>&1 | tee "$OUT/bench_ops.log" ;;
        *) [ -f "benchmarks/$step.py" ] && timeout ${GEN_TIMEOUT:-200} python3 "benchmarks/$step.py" --reps 2 $GEN_ARGS --out "$OUT/gpu_$step.json" 2>&1 | tee "$OUT/bench_$step.log" ;;
      esac ;;
  esac
done
wait
