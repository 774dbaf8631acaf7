#!/usr/bin/env bash
# `make demo`: the end-to-end run on this machine's CPUs in a few minutes.
#   1. a quick profile of this machine (or the local-cpu preset if the profiler is unavailable);
#   2. a short `flexmoe train` with 2 processes that re-plans live and records its routing trace;
#   3. `flexmoe compare` on that trace and on a synthetic one (and, with DEMO_REAL=1, on the real
#      GPT-MoE excerpt in ../shared/traces); each prints its table and writes a report with figures.
# Outputs go to $DEMO_DIR (default: demo-out/, git-ignored). Steps that cannot run say why and the demo goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${DEMO_DIR:-demo-out}
BUDGET=${DEMO_ILP_BUDGET:-0.5}
mkdir -p "$OUT"
reports=()

banner() { printf '\n== %s\n' "$*"; }

banner "1/4 cluster: quick profile of this machine"
# 8 experts on 2 processes: 4 each plus a spare slot, as `flexmoe train --slots 5` below.
if flexmoe profile --help >/dev/null 2>&1 && flexmoe profile --quick --slots 5 -o "$OUT/cluster.json"; then
    :
else
    echo "flexmoe profile is not available or failed: using the nominal local-cpu preset instead"
    flexmoe cluster preset local-cpu --slots 5 -o "$OUT/cluster.json"
fi

banner "2/4 train: 2 processes, live re-planning, trace recorded"
train_trace="$OUT/train_trace.npz"
rm -f "$train_trace"
if flexmoe train --help >/dev/null 2>&1; then
    # A router skewed towards low expert ids makes the imbalance that live re-planning corrects.
    if ! flexmoe train --world-size 2 --steps 60 --interval 10 --router-skew 1.0 --slots 5 \
            --cluster "$OUT/cluster.json" --trace-out "$train_trace"; then
        echo "flexmoe train failed (see above): skipping the comparison on its trace"
    fi
else
    echo "flexmoe train is not available in this build: skipping the live run and its trace"
fi

if [[ -f "$train_trace" ]]; then
    banner "3/4 compare on the trace recorded by flexmoe train"
    flexmoe compare -c "$OUT/cluster.json" -t "$train_trace" -o "$OUT/compare-train" \
        --interval 5 --time-budget "$BUDGET"
    reports+=("$OUT/compare-train")
else
    banner "3/4 compare on the training trace: skipped (no trace was recorded)"
fi

banner "4/4 compare on a synthetic drifting trace, 16 A100s (2 nodes x 8), 3 slots each"
flexmoe trace synth drift -o "$OUT/synth_drift.npz" --steps 60 --layers 2 --sources 16 --experts 32 \
    --tokens-per-source 8192 --drift 0.3 --seed 0
flexmoe cluster preset dgx-a100-2x8 --slots 3 -o "$OUT/dgx-a100-2x8.json"
flexmoe compare -c "$OUT/dgx-a100-2x8.json" -t "$OUT/synth_drift.npz" -o "$OUT/compare-synth" \
    --interval 5 --time-budget "$BUDGET"
reports+=("$OUT/compare-synth")

# The real GPT-MoE excerpt takes about 2.5 more minutes on 2 cores (60 ILP solves): opt in with DEMO_REAL=1.
excerpt=${DEMO_EXCERPT:-../shared/traces/smartmoe_excerpt.npz}
if [[ -f "$excerpt" && -n "${DEMO_REAL:-}" ]]; then
    banner "extra: the real GPT-MoE trace excerpt (SmartMoE-AE), same cluster, re-plan every 5 trace steps"
    flexmoe compare -c "$OUT/dgx-a100-2x8.json" -t "$excerpt" -o "$OUT/compare-real" \
        --interval 5 --time-budget "$BUDGET"
    reports+=("$OUT/compare-real")
elif [[ -f "$excerpt" ]]; then
    echo
    echo "(the real GPT-MoE excerpt is at $excerpt: DEMO_REAL=1 make demo compares on it too)"
fi

banner "done"
for r in "${reports[@]}"; do
    echo "report: $r/report.md   figures: $(cd "$r" && ls -- *.png | tr '\n' ' ')"
done
