#!/usr/bin/env bash
# Time one tuning run spread over N GPUs of one host: one worker process per GPU, all sharing
# one optuna storage, as README.md's tuning section describes.
#
#   bash benchmarks/multi_gpu_tune.sh                      # every GPU, a fresh journal file
#   GPUS=1 bash benchmarks/multi_gpu_tune.sh               # the one-GPU baseline
#   STORAGE='postgresql+psycopg2://tune@/postgres?host=/tmp/pg/sock&port=5433' \
#     bash benchmarks/multi_gpu_tune.sh                    # a PostgreSQL storage (empty)
#
# Settings (environment):
#   GPUS          workers, one per GPU 0..GPUS-1 (default: the GPUs nvidia-smi lists)
#   TOKENS        token buckets (default 1,4,16,64,256,1024,4096,8192)
#   TRIALS        trials per study (default 12)
#   PRESET        layer preset (default nemotron-3-super)
#   STORAGE       optuna storage: a journal file path or a URL (default: a journal file in the
#                 work folder); it must hold no study yet, or nothing would be timed
#   OUTDIR        logs, the tuned table and the summary JSON (default ./multi_gpu_out)
#   LABEL         names the outputs (default <GPUS>gpu_<storage kind>)
#   KERNEL_CACHE  built kernels shared by every process (default: the usual cache's kernels/)
#   WORK          scratch folder (default: a fresh one under $TMPDIR or /tmp)
#   PYTHON        interpreter (default python3)
#
# Steps, each timed and logged to OUTDIR/<label>_<step>.log:
#   0 warm       the leader's command against a scratch journal: compiles whatever candidate is
#                missing from KERNEL_CACHE, so that step 1 times study set-up, not nvcc
#   1 leader     --trials 0 on GPU 0: creates every study and queues every candidate
#   2 workers    GPUS processes with --worker, one per GPU, in parallel
#   3 collector  the full command on GPU 0: writes the tuned table and prints it, after timing
#                whatever the workers left (their configs, then the tile orders and the torch
#                peer of each bucket; nothing when every worker finished)
# Then OUTDIR/multi_gpu_<label>.json holds the settings, the seconds of each step and the
# evaluations per process (counted in the storage by the pid each trial records), and
# OUTDIR/tuned_<label>.json the table, for benchmarks/compare_tables.py.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
# python -m autotune must import this checkout wherever the script is started from.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z ${GPUS:-} ]]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if ! [[ $GPUS =~ ^[1-9][0-9]*$ ]]; then
  echo "GPUS must be a positive count (default: what nvidia-smi -L lists), got '$GPUS'" >&2
  exit 2
fi
TOKENS=${TOKENS:-1,4,16,64,256,1024,4096,8192}
TRIALS=${TRIALS:-12}
PRESET=${PRESET:-nemotron-3-super}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/multi_gpu_tune.XXXXXX")}
STORAGE=${STORAGE:-$WORK/studies.journal}
case $STORAGE in
  postgresql*://*) KIND=postgresql ;;
  *://*) KIND=${STORAGE%%:*}; KIND=${KIND%%+*} ;;  # sqlite:///..., mysql+pymysql://...
  *) KIND=journal ;;
esac
LABEL=${LABEL:-${GPUS}gpu_$KIND}
OUTDIR=$(mkdir -p "${OUTDIR:-./multi_gpu_out}" && cd "${OUTDIR:-./multi_gpu_out}" && pwd)
USER_CACHE=${AUTOTUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/autotune}  # autotune/env.py's
KERNEL_CACHE=${KERNEL_CACHE:-$USER_CACHE/kernels}

# --cache-dir decides where the journal, the tuned table and the plot go, and it also becomes
# AUTOTUNE_CACHE_DIR, which holds the built kernels. A fresh cache folder per run keeps this run's
# table from merging into an earlier one; its kernels/ links to the shared kernel cache so that no
# process compiles what another already built.
CACHE=$WORK/cache
mkdir -p "$CACHE" "$KERNEL_CACHE"
ln -sfn "$(cd "$KERNEL_CACHE" && pwd)" "$CACHE/kernels"

COMMON=(-m autotune --arch sm90 --preset "$PRESET" --tokens "$TOKENS" --cache-dir "$CACHE")
now() { date +%s.%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
log() { echo "[multi_gpu_tune] $*" >&2; }

log "label $LABEL: $GPUS GPU(s), tokens $TOKENS, $TRIALS trials, $KIND storage, work in $WORK"

# A storage that already holds these studies would have its trials counted as done: refuse it.
"$PYTHON" - "$STORAGE" <<'EOF'
import sys

import optuna

from autotune.tune import open_storage

names = [s.study_name for s in optuna.get_all_study_summaries(open_storage(sys.argv[1], ""))]
if names:
    sys.exit(f"storage {sys.argv[1]} already holds {len(names)} studies (e.g. {names[0]}); "
             "give an empty one")
EOF

# Steps 0 and 1 run the same command; only the storage differs. --trials 0 exits 0 (earlier
# commits reported the missing winners with 1, hence the tolerance); above 1 is an error.
seed_studies() {  # $1: storage, $2: log name
  local rc=0
  CUDA_VISIBLE_DEVICES=0 "$PYTHON" "${COMMON[@]}" --trials 0 --storage "$1" \
    2>&1 | tee "$OUTDIR/${LABEL}_$2.log" || rc=$?
  if ((rc > 1)); then log "$2 failed (exit $rc)"; exit 1; fi
}
t_start=$(now)
log "step 0: warm the kernel cache ($KERNEL_CACHE)"
seed_studies "$WORK/warm.journal" warm
t_warm=$(now)

log "step 1: leader creates and seeds the studies"
seed_studies "$STORAGE" leader
t_leader=$(now)

log "step 2: $GPUS worker(s)"
# Each worker's output goes to its own log (interleaved progress bars would be unreadable). The
# subshell records the python process's pid (trials store it), exit code and own duration.
pids=()
stop_workers() {  # on Ctrl-C: end the worker processes this script started, by pid
  local f
  for f in "$WORK"/worker*.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null; done
  return 0
}
trap 'stop_workers; exit 130' INT TERM
for ((i = 0; i < GPUS; i++)); do
  (
    t0=$(now)
    CUDA_VISIBLE_DEVICES=$i "$PYTHON" "${COMMON[@]}" --trials "$TRIALS" --storage "$STORAGE" \
      --worker >"$OUTDIR/${LABEL}_worker$i.log" 2>&1 &
    pid=$!
    echo "$pid" >"$WORK/worker$i.pid"
    rc=0
    wait "$pid" || rc=$?
    echo "$rc $(seconds "$t0" "$(now)")" >"$WORK/worker$i.done"
  ) &
  pids+=($!)
done
wait "${pids[@]}" || true  # each exit code is read from its .done file below
trap - INT TERM
t_workers=$(now)
failed=0
for ((i = 0; i < GPUS; i++)); do
  read -r rc secs <"$WORK/worker$i.done"
  log "worker $i (GPU $i, pid $(cat "$WORK/worker$i.pid")): exit $rc after $secs s"
  [[ $rc == 0 ]] || { failed=1; tail -n 20 "$OUTDIR/${LABEL}_worker$i.log" >&2; }
done
[[ $failed == 0 ]] || { log "a worker failed; logs in $OUTDIR"; exit 1; }

log "step 3: collector finishes the studies and writes the table"
CUDA_VISIBLE_DEVICES=0 "$PYTHON" "${COMMON[@]}" --trials "$TRIALS" --storage "$STORAGE" \
  2>&1 | tee "$OUTDIR/${LABEL}_collector.log"
t_end=$(now)

table=$(find "$CACHE/tuned" -name '*.json' 2>/dev/null | head -n 1)
if [[ -n $table ]]; then cp "$table" "$OUTDIR/tuned_$LABEL.json"; fi

# The summary: settings, step times, and per process the evaluations it ran (by trial pid).
WARM_S=$(seconds "$t_start" "$t_warm")
LEADER_S=$(seconds "$t_warm" "$t_leader")
WORKERS_S=$(seconds "$t_leader" "$t_workers")
COLLECTOR_S=$(seconds "$t_workers" "$t_end")
TOTAL_S=$(seconds "$t_warm" "$t_end")  # leader to table: the tuning itself, without the warm-up
export LABEL GPUS TOKENS TRIALS PRESET STORAGE KIND OUTDIR WORK
export WARM_S LEADER_S WORKERS_S COLLECTOR_S TOTAL_S
"$PYTHON" - <<'EOF'
import collections
import json
import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autotune import tune

env = os.environ
work, out = Path(env["WORK"]), Path(env["OUTDIR"])
gpus = int(env["GPUS"])
who = {}  # pid -> process name
for i in range(gpus):
    who[int((work / f"worker{i}.pid").read_text())] = f"worker{i}"
per = collections.defaultdict(collections.Counter)
storage = tune.open_storage(env["STORAGE"], "")
for s in optuna.get_all_study_summaries(storage):
    kind = "order" if "|order|" in s.study_name else "config"
    study = optuna.load_study(study_name=s.study_name, storage=storage)
    for t in study.get_trials(deepcopy=False):
        name = who.get(t.user_attrs.get("pid"), "collector")
        if t.state == TrialState.COMPLETE:
            per[name][f"{kind}_complete"] += 1
        if t.state.is_finished() and t.user_attrs.get("outcome") in tune._EVALUATED:
            per[name][f"{kind}_evaluated"] += 1
        if t.user_attrs.get("outcome") == "duplicate":
            per[name]["duplicates"] += 1
workers = {}
for i in range(gpus):
    rc, secs = (work / f"worker{i}.done").read_text().split()
    workers[f"worker{i}"] = {"gpu": i, "exit": int(rc), "seconds": float(secs),
                             **per.pop(f"worker{i}", {})}
label = env["LABEL"]
table = out / f"tuned_{label}.json"
summary = {
    "label": label, "gpus": gpus, "tokens": [int(t) for t in env["TOKENS"].split(",")],
    "trials": int(env["TRIALS"]), "preset": env["PRESET"], "storage_kind": env["KIND"],
    "seconds": {"warm": float(env["WARM_S"]), "leader": float(env["LEADER_S"]),
                "workers": float(env["WORKERS_S"]), "collector": float(env["COLLECTOR_S"])},
    "total_seconds": float(env["TOTAL_S"]),  # leader + workers + collector
    "total_with_warm_seconds": float(env["TOTAL_S"]) + float(env["WARM_S"]),
    "workers": workers, "collector": dict(per.pop("collector", {})),
    "table": table.name if table.is_file() else None,
}
path = out / f"multi_gpu_{label}.json"
path.write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
print(f"summary: {path}")
EOF
