#!/usr/bin/env bash
# `make chaos-local`: the local chaos experiments on the embedded runtime, turned into data.
#
# For each seed: start `twlb up` on the sample TrustCluster (its own state dir and free
# ports), record the balancer's feature windows and the ground truth in the background,
# run every local experiment with `chaos run --journal-path`, then stop the recorder and
# the runtime by their pids (also on error or Ctrl-C, through the trap). Finally label
# the recorded windows from the journals into one dataset and train on it.
#
# Settings (environment): BIN (virtualenv bin), OUT (default reports/chaos), CHAOS_SEEDS
# (default "11 12 13": training holds out whole seeds, so it needs at least three),
# CHAOS_EXPERIMENTS, CLUSTER_FILE, CHAOS_TRAIN (0 to skip training).
set -euo pipefail

BIN=${BIN:-.venv/bin}
OUT=${OUT:-reports/chaos}
SEEDS=${CHAOS_SEEDS:-"11 12 13"}
# balancer_kill last: the restarted balancer starts its trust afresh.
EXPERIMENTS=${CHAOS_EXPERIMENTS:-"backend_failure byzantine_node latency_injection node_restart_storm balancer_kill"}
CLUSTER_FILE=${CLUSTER_FILE:-chaos/local/cluster.yaml}
TRAIN=${CHAOS_TRAIN:-1}
READY_TIMEOUT_S=90

mkdir -p "$OUT"
started=()

stop_started() {
    local pid
    for pid in "${started[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    started=()
}
trap stop_started EXIT
trap 'stop_started; exit 130' INT TERM

status=0
recordings=()
journals=()
for seed in $SEEDS; do
    run="$OUT/seed-$seed"
    rm -rf "$run"
    mkdir -p "$run"
    sed "s/^  seed: .*/  seed: $seed/" "$CLUSTER_FILE" >"$run/cluster.yaml"
    port=$("$BIN/python" -c 'from twlb.processes.managed import free_port_range; print(free_port_range(8))')
    echo "seed $seed: twlb up on port base $port (state $run/state)"
    "$BIN/twlb" up -f "$run/cluster.yaml" --port-base "$port" --state-dir "$run/state" \
        --no-prometheus --duration 1800 >"$run/up.log" 2>&1 &
    up=$!
    started+=("$up")
    for _ in $(seq $((READY_TIMEOUT_S * 2))); do
        [[ -f "$run/state/state.json" ]] && break
        kill -0 "$up" 2>/dev/null || break
        sleep 0.5
    done
    if [[ ! -f "$run/state/state.json" ]]; then
        echo "seed $seed: the cluster did not come up; see $run/up.log" >&2
        tail -n 20 "$run/up.log" >&2 || true
        exit 1
    fi
    # A short load first, so the first hypothesis does not measure a cold balancer.
    balancer=$("$BIN/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["balancer"]["url"])' \
        "$run/state/state.json")
    "$BIN/twlb" load --url "$balancer" --rate 50 --duration 5 --mode basic --quiet \
        --out "$run/warmup.json" >/dev/null || true
    "$BIN/python" -m twlb.chaos record --state-dir "$run/state" --out "$run/recording.jsonl" \
        --run-id "chaos-seed-$seed" --seed "$seed" --max-duration 1800 >"$run/record.log" 2>&1 &
    started+=("$!")
    recordings+=(--recording "$run/recording.jsonl")
    for experiment in $EXPERIMENTS; do
        journal="$run/$experiment.journal.json"
        # Rollbacks always: Chaos Toolkit's default skips them when the steady state
        # deviates, which would leave the fault in place for every later experiment.
        TWLB_CHAOS_STATE_DIR="$run/state" "$BIN/chaos" --no-version-check \
            --log-file "$run/$experiment.log" run --rollback-strategy always \
            --journal-path "$journal" "chaos/local/$experiment.json" || true
        # The journal, not chaos's exit status, says whether the steady state held.
        "$BIN/python" -m twlb.chaos check "$journal" || status=1
        journals+=(--journal "$journal")
    done
    stop_started
done

"$BIN/python" -m twlb.chaos dataset "${recordings[@]}" "${journals[@]}" --out "$OUT/dataset.parquet"
if [[ "$TRAIN" != "0" ]]; then
    "$BIN/twlb" train --data "$OUT/dataset.parquet" --out "$OUT/model" || status=1
fi
exit $status
