#!/bin/bash
# Stall reasons, issue rate, memory throughput and shared-memory conflicts of the split-state
# kernels of one training step, per ScanConfig override (Nsight Compute, GPU machine):
#   bash benchmarks/ncu_bwd.sh "" "bwd_quad_warps=8" "state_mem_limit=0"
M=gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum
M=$M,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__warps_active.avg.per_cycle_active
M=$M,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
M=$M,smsp__inst_executed_op_local_ld.sum,smsp__inst_executed_op_local_st.sum
M=$M,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio
for cfg in "$@"; do
  echo "=== set: $cfg"
  ncu --kernel-name regex:"bwd_quad|fwd_quad" --launch-skip 1 --launch-count 2 --metrics "$M" \
      python3 benchmarks/scan_ncu_step.py --set "$cfg" 2>&1 | grep -v "^==PROF==\|^  *$" \
      | grep -v "_per_issue_active.ratio *inst *0\.0"
done
