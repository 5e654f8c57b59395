#!/usr/bin/env bash
# A local multi-process Ray head for development runs, with token authentication on: jobs then
# run through `ray job submit` or `RAY_ADDRESS=... orchestrator ...` the way they do on a cluster.
# Usage: bash cluster/local_head.sh start|stop|status
#   RAY_PORT            GCS port (default 6379)
#   RAY_NUM_CPUS        CPUs Ray may use (default: this machine's count)
#   RAY_DASHBOARD_PORT  dashboard / job submission port (default 8265)
# Uses .venv/bin/ray when present, else `ray` on PATH. Keep one Ray instance per machine:
# `stop` runs `ray stop`, which ends every Ray process of this user on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  echo "local_head.sh: $*" >&2
  exit 1
}

if [ -x .venv/bin/ray ]; then
  RAY=$PWD/.venv/bin/ray
elif command -v ray >/dev/null 2>&1; then
  RAY=$(command -v ray)
else
  die "no Ray found: run 'bash scripts/setup.sh' (creates .venv) or put 'ray' on PATH"
fi
BIN=$(dirname "$RAY")
# The Python next to that ray, to read the address Ray recorded (see start).
PY=$BIN/python

PORT=${RAY_PORT:-6379}
NUM_CPUS=${RAY_NUM_CPUS:-$(nproc)}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
for pair in "RAY_PORT=$PORT" "RAY_NUM_CPUS=$NUM_CPUS" "RAY_DASHBOARD_PORT=$DASHBOARD_PORT"; do
  case ${pair#*=} in
    '' | *[!0-9]*) die "${pair%%=*} must be a whole number, got '${pair#*=}'" ;;
  esac
done

start() {
  # `ray start --head` needs the token to exist already: reuse ~/.ray/auth_token (or the one
  # RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH name), else create it. stdout is the token: not shown.
  "$RAY" get-auth-token --generate >/dev/null ||
    die "could not read or create the Ray auth token (~/.ray/auth_token)"
  # RAY_AUTH_MODE=token turns authentication on explicitly, whatever the caller's environment
  # says; every process of this instance inherits it, the job drivers it starts included. So do
  # they inherit PATH: with ray's own folder first, a submitted entrypoint finds `orchestrator`
  # and `python` of the same environment even when the caller has not activated it.
  # --disable-usage-stats: a dev head reports nothing to Ray's usage-stats server.
  if ! PATH="$BIN:$PATH" RAY_AUTH_MODE=token "$RAY" start --head \
    --port "$PORT" \
    --num-cpus "$NUM_CPUS" \
    --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASHBOARD_PORT" \
    --disable-usage-stats; then
    die "ray start failed (see above). Is Ray already running? 'bash cluster/local_head.sh status'; stop it with 'bash cluster/local_head.sh stop', or pick another RAY_PORT"
  fi
  # Ray binds the GCS to this machine's own interface address, not 127.0.0.1; `ray start` records
  # that address (ray_current_cluster in its temp folder), which is the one to join.
  local address
  address=$("$PY" -c 'from ray._private.services import find_bootstrap_address
print(find_bootstrap_address(None) or "")' 2>/dev/null || true)
  address=${address:-127.0.0.1:$PORT}
  cat <<EOF

Ray head running ($NUM_CPUS CPUs). In the shell that runs jobs:
  export RAY_AUTH_MODE=token                                   # clients send the token
  export RAY_ADDRESS=$address                                   # orchestrator train and search
  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT   # ray job submit, status, logs
The token is read from ~/.ray/auth_token on this machine ('$RAY get-auth-token' prints it);
elsewhere set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH. Then, e.g.:
  ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- orchestrator search jobs/debug/search.yaml
Stop it with: bash cluster/local_head.sh stop
EOF
}

stop() {
  "$RAY" stop || die "ray stop failed (see above)"
}

status() {
  # `ray status` joins the recorded cluster, so it needs the token like any client.
  RAY_AUTH_MODE=token "$RAY" status ||
    die "no reachable Ray head (start one with: bash cluster/local_head.sh start)"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: bash cluster/local_head.sh start|stop|status" >&2
    exit 2
    ;;
esac
