#!/usr/bin/env bash
# A local 3-node comodit cluster on this machine (run as root or with sudo), for trying the cluster
# out and for the failover and handoff figures.
#
#   deploy/cluster.sh            start (or restart) nodes 1-3 and a local agent, then show the cluster
#   deploy/cluster.sh join 4     start node 4 and let it join through node 1
#   deploy/cluster.sh decommission 4   hand node 4's shards off; its process exits by itself
#   deploy/cluster.sh kill 2     SIGKILL node 2 (its shards move after its lease expires)
#   deploy/cluster.sh start 2    start node 2 again from its Raft state
#   deploy/cluster.sh stop       stop every process this script started
#
# Installs and starts RabbitMQ and PostgreSQL when absent. The members share the PostgreSQL
# database `comodit_cluster` and the broker prefix `comodit-cluster` (so a quickstart node can run
# beside them). Node N: API 127.0.0.1:808N, Raft 127.0.0.1:700N, data .state/cluster/node-N.
# The three founders start at the same moment on purpose: the first start on an empty database
# must be safe for members racing each other.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/common.sh

STATE="$PWD/.state/cluster"
PREFIX="comodit-cluster"
DB="comodit_cluster"
PG_URL="postgres://comodit:comodit@127.0.0.1:5432/$DB"
BIN="$PWD/target/release"
mkdir -p "$STATE"

api_port() { echo $((8080 + $1)); }
raft_port() { echo $((7000 + $1)); }
pidfile() { echo "$STATE/node-$1.pid"; }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {
  local f="$1"
  if running "$f"; then
    kill "$(cat "$f")"
    for _ in $(seq 1 100); do running "$f" || break; sleep 0.1; done
  fi
  rm -f "$f"
}

# start_node ID [founder|join]
start_node() {
  local id="$1" mode="${2:-founder}"
  stop_pid "$(pidfile "$id")"
  local -a cluster_env=(COMODIT_CLUSTER_ID="$id" COMODIT_CLUSTER_LISTEN="127.0.0.1:$(raft_port "$id")"
    COMODIT_CLUSTER_SECRET="$(cat "$STATE/secret")")
  if [ "$mode" = join ]; then
    cluster_env+=(COMODIT_CLUSTER_JOIN="127.0.0.1:$(raft_port 1),127.0.0.1:$(raft_port 2)")
  else
    cluster_env+=(COMODIT_CLUSTER_PEERS="1=127.0.0.1:$(raft_port 1),2=127.0.0.1:$(raft_port 2),3=127.0.0.1:$(raft_port 3)")
  fi
  log "starting node $id ($mode): API 127.0.0.1:$(api_port "$id"), Raft 127.0.0.1:$(raft_port "$id")"
  env COMODIT_LISTEN="127.0.0.1:$(api_port "$id")" COMODIT_DATA_DIR="$STATE/node-$id" \
    COMODIT_PREFIX="$PREFIX" COMODIT_ENROLL_USER="$PREFIX-enroll" COMODIT_ENROLL_PASSWORD="$PREFIX-enroll" \
    COMODIT_STORE=postgres COMODIT_POSTGRES_URL="$PG_URL" "${cluster_env[@]}" \
    nohup "$BIN/comodit-node" >>"$STATE/node-$id.log" 2>&1 &
  echo $! > "$(pidfile "$id")"
}

wait_healthy() {
  local id="$1"
  for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:$(api_port "$id")/healthz" >/dev/null 2>&1 && return 0
    running "$(pidfile "$id")" || die "node $id exited; see $STATE/node-$id.log"
    sleep 0.5
  done
  die "node $id did not become healthy; see $STATE/node-$id.log"
}

# The admin token: written by whichever founder bootstrapped the empty database.
token_file() {
  local f
  for f in "$STATE"/node-*/admin-token; do
    [ -s "$f" ] && { echo "$f"; return 0; }
  done
  die "no admin token in $STATE/node-*/admin-token"
}

cluster_json() {
  curl -fsS -H "Authorization: Bearer $(cat "$(token_file)")" "http://127.0.0.1:$(api_port "$1")/api/v1/cluster"
}

# wait_settled VIA_ID N: a leader, and every shard owned by one of N active nodes with a valid lease.
wait_settled() {
  local via="$1" want="$2" out=""
  for _ in $(seq 1 120); do
    out=$(cluster_json "$via" 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)
want = int(sys.argv[1])
active = [n for n in v["nodes"] if n["state"] == "active"]
owned = all(s["owner"] is not None for s in v["shards"])
ok = v["leader"] is not None and len(active) == want and owned and all(n["shards"] for n in active)
print("ok" if ok else "wait")
' "$want" 2>/dev/null || true)
    [ "$out" = ok ] && return 0
    sleep 0.5
  done
  die "the cluster did not settle on $want active nodes; see $STATE/node-*.log"
}

show() {
  cluster_json "$1" | python3 -c '
import json, sys
v = json.load(sys.stdin)
print("leader %s, term %s, %d shards" % (v["leader"], v["term"], len(v["shards"])))
for n in v["nodes"]:
    print("  node %s: %-8s %-8s %3d shards  raft %s" % (n["id"], n["state"], n["role"], len(n["shards"]), n["addr"]))
'
}

ensure_database() {
  if ! PGPASSWORD=comodit psql -h 127.0.0.1 -U comodit -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    log "creating database $DB"
    PGPASSWORD=comodit createdb -h 127.0.0.1 -U comodit "$DB"
  fi
}

build() {
  log "building release binaries"
  cargo build --release --locked -p comodit-node -p comodit-agent -p comodit-cli 2>&1 | tail -n 1
}

up() {
  ensure_rust
  ensure_rabbitmq
  ensure_postgres
  apt_install curl python3
  build
  ensure_database
  if [ ! -s "$STATE/secret" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 > "$STATE/secret")
  fi
  # All three at once (see the header).
  for id in 1 2 3; do start_node "$id"; done
  for id in 1 2 3; do wait_healthy "$id"; done
  wait_settled 1 3

  local token agent_state="$STATE/agent" host
  token=$(cat "$(token_file)")
  if [ ! -f "$agent_state/credentials.json" ]; then
    log "enrolling a local agent through node 2"
    local secret
    secret=$(curl -fsS -X POST -H "Authorization: Bearer $token" -H 'content-type: application/json' \
      --data '{"expires_in_s": 600, "max_uses": 1, "description": "cluster.sh"}' \
      "http://127.0.0.1:$(api_port 2)/api/v1/orgs/default/envs/default/enrollment-tokens" \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
    COMODIT_STATE_DIR="$agent_state" COMODIT_PREFIX="$PREFIX" COMODIT_ENROLL_USER="$PREFIX-enroll" \
      COMODIT_ENROLL_PASSWORD="$PREFIX-enroll" "$BIN/comodit-agent" enroll --token "$secret"
  fi
  host=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["host"])' "$agent_state/credentials.json")
  stop_pid "$STATE/agent.pid"
  COMODIT_STATE_DIR="$agent_state" COMODIT_PREFIX="$PREFIX" nohup "$BIN/comodit-agent" run >>"$STATE/agent.log" 2>&1 &
  echo $! > "$STATE/agent.pid"
  log "running 'echo hello' on host $host through each member's API"
  for id in 1 2 3; do
    local status=""
    for _ in $(seq 1 60); do
      status=$(curl -sS -X POST -H "Authorization: Bearer $token" -H 'content-type: application/json' \
        --data '{"argv": ["echo", "hello"]}' \
        "http://127.0.0.1:$(api_port "$id")/api/v1/hosts/$host/run?wait_s=5" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status"))' 2>/dev/null || true)
      [ "$status" = applied ] && break
      sleep 0.5
    done
    [ "$status" = applied ] || die "run through node $id: status '$status'; see $STATE/*.log"
    echo "  via node $id: applied"
  done
  show 1
  cat <<INFO

a 3-node comodit cluster is running.
  APIs:          http://127.0.0.1:8081 .. 8083 /api/v1 (any member answers any request)
  admin token:   $(token_file)
  status:        $BIN/comodit --url http://127.0.0.1:8081 --token-file $(token_file) cluster
  host:          $host (agent log: $STATE/agent.log)
  more:          deploy/cluster.sh join 4 | decommission 4 | kill 2 | start 2 | stop
INFO
}

case "${1:-up}" in
  up) up ;;
  join)
    id="${2:?usage: deploy/cluster.sh join ID}"
    start_node "$id" join
    wait_healthy "$id"
    wait_settled 1 "$(cluster_json 1 | python3 -c 'import json,sys; print(1 + sum(n["state"] == "active" and n["id"] != int(sys.argv[1]) for n in json.load(sys.stdin)["nodes"]))' "$id")"
    show 1 ;;
  decommission)
    id="${2:?usage: deploy/cluster.sh decommission ID}"
    via=1; [ "$id" = 1 ] && via=2
    "$BIN/comodit" --url "http://127.0.0.1:$(api_port "$via")" --token-file "$(token_file)" cluster decommission "$id"
    for _ in $(seq 1 120); do running "$(pidfile "$id")" || break; sleep 0.5; done
    running "$(pidfile "$id")" && die "node $id is still running; see $STATE/node-$id.log"
    log "node $id handed its shards off and exited"
    rm -f "$(pidfile "$id")"
    show "$via" ;;
  kill)
    id="${2:?usage: deploy/cluster.sh kill ID}"
    running "$(pidfile "$id")" && kill -9 "$(cat "$(pidfile "$id")")"
    rm -f "$(pidfile "$id")"
    log "node $id killed" ;;
  start)
    id="${2:?usage: deploy/cluster.sh start ID}"
    if [ "$id" -le 3 ]; then start_node "$id"; else start_node "$id" join; fi
    wait_healthy "$id" ;;
  stop)
    stop_pid "$STATE/agent.pid"
    for f in "$STATE"/node-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
    log "stopped" ;;
  *) die "unknown command $1 (up, join ID, decommission ID, kill ID, start ID, stop)" ;;
esac
