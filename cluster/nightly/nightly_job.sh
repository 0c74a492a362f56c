#!/usr/bin/env bash
# The nightly regression run. It runs ON the cluster, as a Ray job (submit_nightly.sh submits it):
#   1. the fixed study (CONFIG, default configs/default.yaml) into a dated directory on shared storage,
#   2. `mpqsweep regress` against the last good run (a symlink; the first night has none: it becomes it),
#   3. on no regression, the new run becomes the last good run.
# Exit status (the job's, and `ray job submit`'s): 0 no regression, 1 regression or failure, 2 bad input.
# Extra arguments are config overrides for the study, e.g. resources.use_gpu=true.
set -euo pipefail

ROOT=${MPQ_NIGHTLY_ROOT:-/mnt/shared/nightly}         # shared storage every node mounts
CONFIG=${MPQ_NIGHTLY_CONFIG:-configs/default.yaml}     # fixed: change it and start a new ROOT
TOLERANCES=${MPQ_NIGHTLY_TOLERANCES:-cluster/nightly/tolerances.yaml}
STAMP=${MPQ_NIGHTLY_STAMP:-$(date -u +%Y%m%d-%H%M%S)}
RUN_DIR="$ROOT/runs/$STAMP"
mkdir -p "$ROOT/runs"

# resources.address=auto: join the cluster this job runs on (Ray sets RAY_ADDRESS for the job).
python -m orchestrator.cli run "$CONFIG" "study.name=nightly-$STAMP" "study.dir=$RUN_DIR" \
    "resources.storage_path=$ROOT/ray" resources.address=auto "$@"

if [[ -e "$ROOT/last-good" ]]; then
    set +e
    python -m orchestrator.cli regress --baseline "$ROOT/last-good" --candidate "$RUN_DIR" \
        --tolerances "$TOLERANCES" --out "$RUN_DIR/regress"
    code=$?
    set -e
    if [[ $code -ne 0 ]]; then
        echo "nightly $STAMP: regression against $(readlink -f "$ROOT/last-good"); report: $RUN_DIR/regress/regression.md"
        exit "$code"
    fi
else
    echo "nightly $STAMP: no last good run yet; this run becomes the baseline"
fi
# Atomic switch of the symlink: a reader never sees it missing.
ln -sfn "$RUN_DIR" "$ROOT/last-good.new"
mv -T "$ROOT/last-good.new" "$ROOT/last-good"
echo "nightly $STAMP: ok; last good run is now $RUN_DIR"
