#!/usr/bin/env bash
# comodit quickstart on a fresh Debian/Ubuntu machine (run as root or with sudo).
#
# Installs and starts RabbitMQ (management and event-exchange plugins), builds the release binaries,
# starts a comodit node with the embedded store, enrolls a local agent to it, and writes a file on
# this host through the REST API. State lives in ./.state/quickstart; re-running restarts cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/common.sh

PORT="${COMODIT_QUICKSTART_PORT:-8080}"
API="http://127.0.0.1:$PORT"
STATE="$PWD/.state/quickstart"
NODE_DATA="$STATE/node"
AGENT_STATE="$STATE/agent"

ensure_rust
ensure_free_disk . 4
ensure_rabbitmq
apt_install curl python3

log "building release binaries"
cargo build --release --locked -p comodit-node -p comodit-agent -p comodit-cli 2>&1 | tail -n 1
BIN="$PWD/target/release"

stop_pid() {
  local f="$1"
  if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
    kill "$(cat "$f")"
    for _ in $(seq 1 100); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
}
mkdir -p "$STATE"
stop_pid "$STATE/agent.pid"
stop_pid "$STATE/node.pid"

log "starting comodit-node on $API (data: $NODE_DATA)"
COMODIT_LISTEN="127.0.0.1:$PORT" COMODIT_DATA_DIR="$NODE_DATA" \
  nohup "$BIN/comodit-node" >"$STATE/node.log" 2>&1 &
echo $! > "$STATE/node.pid"
for _ in $(seq 1 120); do
  curl -fsS "$API/healthz" >/dev/null 2>&1 && break
  kill -0 "$(cat "$STATE/node.pid")" 2>/dev/null || die "the node exited; see $STATE/node.log"
  sleep 0.5
done
curl -fsS "$API/healthz" >/dev/null || die "the node did not become healthy; see $STATE/node.log"
TOKEN_FILE="$NODE_DATA/admin-token"
TOKEN=$(cat "$TOKEN_FILE")

# Credentials from an earlier run whose node data is gone would never work: start the agent afresh.
if [ -f "$AGENT_STATE/credentials.json" ]; then
  OLD=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["host"])' "$AGENT_STATE/credentials.json")
  code=$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$API/api/v1/hosts/$OLD" || true)
  if [ "$code" = 404 ]; then
    log "the node does not know host $OLD any more: enrolling the agent again"
    rm -rf "$AGENT_STATE"
  fi
fi
if [ ! -f "$AGENT_STATE/credentials.json" ]; then
  log "enrolling the local agent"
  SECRET=$(curl -fsS -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    --data '{"expires_in_s": 600, "max_uses": 1, "description": "quickstart"}' \
    "$API/api/v1/orgs/default/envs/default/enrollment-tokens" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  COMODIT_STATE_DIR="$AGENT_STATE" "$BIN/comodit-agent" enroll --token "$SECRET"
fi
HOST=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["host"])' "$AGENT_STATE/credentials.json")

log "starting comodit-agent (host $HOST)"
COMODIT_STATE_DIR="$AGENT_STATE" COMODIT_HEARTBEAT_S=60 nohup "$BIN/comodit-agent" run >"$STATE/agent.log" 2>&1 &
echo $! > "$STATE/agent.pid"
for _ in $(seq 1 120); do
  online=$(curl -fsS -H "Authorization: Bearer $TOKEN" "$API/api/v1/hosts/$HOST" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["runtime"]["online"])' 2>/dev/null || true)
  [ "$online" = "True" ] && break
  sleep 0.5
done
[ "$online" = "True" ] || die "the agent did not come online; see $STATE/agent.log and $STATE/node.log"

CURL="curl -sS -X PUT -H \"Authorization: Bearer \$(cat $TOKEN_FILE)\" -H 'content-type: application/json' \\
  --data '{\"spec\": {\"content\": \"managed by comodit\\n\", \"mode\": \"0640\"}}' \\
  $API/api/v1/hosts/$HOST/resources/files/tmp/comodit-quickstart.txt"
log "writing /tmp/comodit-quickstart.txt through the API"
echo "$CURL"
eval "$CURL" > "$STATE/last-put.json"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({k: r.get(k) for k in ("status", "op", "result")}, indent=2))' "$STATE/last-put.json"
python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("status") == "applied" else 1)' "$STATE/last-put.json" \
  || die "the write through the API did not apply; see $STATE/last-put.json"
ls -l /tmp/comodit-quickstart.txt

cat <<INFO

comodit is running.
  API:             $API/api/v1   (OpenAPI document: $API/api/v1/openapi.json)
  admin token:     $TOKEN_FILE
  this host:       $HOST (online; see: $BIN/comodit --token-file $TOKEN_FILE hosts get $HOST)
  write a file:    $CURL
  logs:            $STATE/node.log, $STATE/agent.log
  stop:            kill \$(cat $STATE/agent.pid) \$(cat $STATE/node.pid)
INFO
