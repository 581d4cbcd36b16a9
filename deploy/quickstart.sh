#!/usr/bin/env bash
# comodit quickstart on a fresh Debian/Ubuntu machine (run as root or with sudo).
#
# Today (before the orchestrator node lands) this sets up the agent half of the system for real:
# RabbitMQ with the management plugin, the DESIGN §5 exchanges, one host's queue and broker user with
# the per-agent permissions, the release `comodit-agent` connected with those credentials — then it
# plays the node's part through RabbitMQ's management API: it sends a `ping` and an `apply` that writes
# a file, and prints the agent's replies. State lives in ./.state/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/common.sh

MGMT="${COMODIT_MGMT_URL:-http://127.0.0.1:15672}"
ADMIN="${COMODIT_MGMT_USER:-guest}:${COMODIT_MGMT_PASSWORD:-guest}"
PREFIX="comodit"
STATE="$PWD/.state/quickstart"

ensure_rust
ensure_rabbitmq
apt_install curl python3

log "building release binaries"
cargo build --release --locked -p comodit-agent 2>&1 | tail -n 1
AGENT="$PWD/target/release/comodit-agent"

api() { # method path [json]
  curl -fsS -u "$ADMIN" -H 'content-type: application/json' -X "$1" "$MGMT/api$2" ${3:+--data "$3"}
}

mkdir -p "$STATE"
if [ -f "$STATE/agent.pid" ] && kill -0 "$(cat "$STATE/agent.pid")" 2>/dev/null; then
  log "stopping the previous quickstart agent"
  kill "$(cat "$STATE/agent.pid")"; sleep 1
fi

HOST_ID=$(cat "$STATE/host-id" 2>/dev/null || python3 -c 'import uuid; print(uuid.uuid4())')
echo "$HOST_ID" > "$STATE/host-id"
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')

log "declaring the topology (DESIGN §5) and host $HOST_ID"
api PUT "/exchanges/%2f/$PREFIX.up" '{"type":"topic","durable":true}'
api PUT "/exchanges/%2f/$PREFIX.down" '{"type":"direct","durable":true}'
api PUT "/queues/%2f/$PREFIX.agent.$HOST_ID" '{"durable":true}'
api POST "/bindings/%2f/e/$PREFIX.down/q/$PREFIX.agent.$HOST_ID" "{\"routing_key\":\"$HOST_ID\"}" >/dev/null
# Stands in for the node's shard queues: everything agents send.
api PUT "/queues/%2f/$PREFIX.quickstart.up" '{"durable":true}'
api POST "/bindings/%2f/e/$PREFIX.up/q/$PREFIX.quickstart.up" '{"routing_key":"up.#"}' >/dev/null
api DELETE "/queues/%2f/$PREFIX.quickstart.up/contents" >/dev/null 2>&1 || true

log "creating the host's broker user with the per-agent permissions"
api PUT "/users/$HOST_ID" "{\"password\":\"$PASSWORD\",\"tags\":\"\"}"
api PUT "/permissions/%2f/$HOST_ID" \
  "{\"configure\":\"^\$\",\"write\":\"^$PREFIX\\\\.up\$\",\"read\":\"^$PREFIX\\\\.agent\\\\.$HOST_ID\$\"}"
api PUT "/topic-permissions/%2f/$HOST_ID" \
  "{\"exchange\":\"$PREFIX.up\",\"write\":\"^up\\\\.[0-9]+\\\\.$HOST_ID\\\\.[a-z_]+\$\",\"read\":\"^\$\"}"

export COMODIT_STATE_DIR="$STATE/agent"
printf '%s' "$PASSWORD" | "$AGENT" credentials --host "$HOST_ID"

log "starting comodit-agent"
COMODIT_BROKER_URL="amqp://127.0.0.1:5672/%2f" COMODIT_HEARTBEAT_S=60 \
  nohup "$AGENT" run >"$STATE/agent.log" 2>&1 &
echo $! > "$STATE/agent.pid"

# Reads what the agent sent (acking it) until a message whose JSON contains $1.
wait_up() {
  for _ in $(seq 1 60); do
    out=$(api POST "/queues/%2f/$PREFIX.quickstart.up/get" '{"count":50,"ackmode":"ack_requeue_false","encoding":"auto"}')
    hit=$(printf '%s' "$out" | python3 -c "
import json,sys
for m in json.load(sys.stdin):
    if '$1' in m['payload']:
        print(m['routing_key']); print(json.dumps(json.loads(m['payload']), indent=2)); break")
    [ -n "$hit" ] && { printf '%s\n' "$hit"; return 0; }
    sleep 1
  done
  die "no message containing $1 from the agent; see $STATE/agent.log"
}

send() { # command JSON
  body=$(python3 -c 'import json,sys; print(json.dumps({"properties":{"content_type":"application/json","type":"command"},"routing_key":sys.argv[1],"payload":sys.argv[2],"payload_encoding":"string"}))' "$HOST_ID" "$1")
  api POST "/exchanges/%2f/$PREFIX.down/publish" "$body" >/dev/null
}

command_json() { # body-json
  python3 -c '
import json,sys,uuid,datetime
now=datetime.datetime.now(datetime.timezone.utc)
cmd={"v":1,"id":str(uuid.uuid4()),"host":sys.argv[1],"epoch":1,
     "issued_at":now.isoformat(),"expires_at":(now+datetime.timedelta(minutes=10)).isoformat(),
     "body":json.loads(sys.argv[2])}
print(json.dumps(cmd))' "$HOST_ID" "$1"
}

log "waiting for the agent's hello"
wait_up '"facts"' | head -n 1

log "ping"
PING=$(command_json '{"op":"ping"}'); send "$PING"
wait_up "$(printf '%s' "$PING" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')" | head -n 12

log "apply: write /tmp/comodit-quickstart.txt (mode 0640) through the agent"
APPLY=$(command_json '{"op":"apply","mode":"enforce","monitor":true,"resources":[{"collection":"files","id":"/tmp/comodit-quickstart.txt","spec":{"content":"managed by comodit\n","mode":"0640"}}]}')
send "$APPLY"
wait_up "$(printf '%s' "$APPLY" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
ls -l /tmp/comodit-quickstart.txt

cat <<INFO

The agent is running (pid $(cat "$STATE/agent.pid"), log $STATE/agent.log) as host $HOST_ID.
It monitors /tmp/comodit-quickstart.txt: edit it and a 'drift' event lands in queue
$PREFIX.quickstart.up (see it at $MGMT, user guest/guest on this machine only).
One-shot mode without a broker:  $AGENT apply resources.json --dry-run
Stop the agent:                  kill \$(cat $STATE/agent.pid)
The orchestrator node (REST API, enrollment) is not built yet: see README, "What works today".
INFO
