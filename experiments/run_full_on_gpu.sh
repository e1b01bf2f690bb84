#!/usr/bin/env bash
# The GPU half of the studies at scale full: the runs that need a CUDA device (seed_memory_table's measured peak,
# checkpointing_tradeoff's memory and tokens/s on the Phi-4-mini shape), each study re-made with
# `qlora-lab reproduce --scale full --update`, so that its results/full/ and the table in its README become the
# GPU-measured ones, ready to commit. On one CUDA machine (no network needed), from the repo root:
#
#     source bench/device_env.sh          # a machine without network: the carried wheels, an offline env
#     bash experiments/run_full_on_gpu.sh
#
# Each study also re-computes its plans there: they must equal the committed predictions exactly (the ledger is a
# function of the config, whatever machine computes it), and the exit status says whether they did. The model is
# Phi-4-mini's architecture with random weights (model=phi4_mini_shape), built once into outputs/cache. Budget: 7
# training jobs of 4-6 steps at 4 x 2048 tokens, each in its own process, ~4 minutes on one H100.
#
# Writes experiments/<study>/results/full/{table.csv,table.md,runs.json,*.png} and experiments/<study>/README.md
# (the table between its `results:full` marks); the run dirs under outputs/studies/<study>/. With $OUT set (a
# folder that comes back from the machine), those files are copied to $OUT/experiments/<study>/ as well: copy
# them over the checkout's and commit.
set -u
cd "$(dirname "$0")/.."
STUDIES="${STUDIES:-seed_memory_table checkpointing_tradeoff}"
status=0
for study in $STUDIES; do
    start=$(date +%s)
    python3 -m qlora_lab.cli reproduce "experiments/$study" --scale full --update "$@"
    rc=$?
    [ $rc -eq 0 ] || status=$rc
    echo "== $study: exit $rc after $(( $(date +%s) - start )) s"
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/experiments/$study"
        cp -r "experiments/$study/results" "experiments/$study/README.md" "$OUT/experiments/$study/"
    fi
done
exit $status
