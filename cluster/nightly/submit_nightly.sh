#!/usr/bin/env bash
# Submit tonight's regression run to a Ray cluster and wait for it (what cron runs; see ./crontab).
# Needs: RAY_API_SERVER_ADDRESS (the dashboard, e.g. http://127.0.0.1:8265 through `ray dashboard` or
# `kubectl port-forward`) and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token.
# MPQ_NIGHTLY_* variables (ROOT, CONFIG, TOLERANCES, STAMP) are passed on to the job; MPQ_NIGHTLY_PIP=1
# adds cluster/runtime_env.yaml's pinned packages (clusters whose image has only Ray).
# Arguments: config overrides for the study, e.g. resources.use_gpu=true.
# Exit status: `ray job submit`'s — 0 when the job (study + regression) succeeded, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."                               # the repository root: uploaded as the working dir
: "${RAY_API_SERVER_ADDRESS:?set RAY_API_SERVER_ADDRESS to the Ray dashboard, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE=token                               # the Ray CLI sends the token only in token mode
RUNTIME_ENV=$(python - <<'PY'
import json, os
import yaml
env = yaml.safe_load(open("cluster/runtime_env.yaml")) if os.environ.get("MPQ_NIGHTLY_PIP") == "1" else {}
env.setdefault("env_vars", {}).update({k: v for k, v in os.environ.items() if k.startswith("MPQ_NIGHTLY_")})
print(json.dumps(env))
PY
)
exec ray job submit --address "$RAY_API_SERVER_ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
    --submission-id "mpq-nightly-$(date -u +%Y%m%d-%H%M%S)" \
    --metadata-json '{"mpq.nightly": "1"}' \
    -- bash cluster/nightly/nightly_job.sh "$@"
