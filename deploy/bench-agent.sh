#!/usr/bin/env bash
# Measures the agent's figures for the README: stripped release binary size, and the time to apply
# 1,000 file resources (first pass and idempotent second pass) with the one-shot mode.
# Idle RSS is measured on a running agent: `deploy/quickstart.sh`, wait 10 minutes, then
#   ps -o rss= -p "$(cat .state/quickstart/agent.pid)"
# Usage: deploy/bench-agent.sh [runs]   (default 5 runs of each pass)
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/common.sh
ensure_rust
RUNS="${1:-5}"

cargo build --release --locked -p comodit-agent 2>&1 | tail -n 1
AGENT="$PWD/target/release/comodit-agent"
echo "binary: $(stat -c %s "$AGENT") bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s "$AGENT")")), stripped: $(file -b "$AGENT" | grep -o 'not stripped\|stripped' || echo '?')"

work=$(mktemp -d /tmp/comodit-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, sys
d = sys.argv[1]
res = [{"collection": "directories", "id": f"{d}/tree", "spec": {"mode": "0755"}}]
res += [{"collection": "files", "id": f"{d}/tree/file-{i:04}.conf",
         "spec": {"content": f"key = {i}\n" * 20, "mode": "0644"}} for i in range(1000)]
json.dump(res, open(f"{d}/resources.json", "w"))
PY

ms() { echo $(( $(date +%s%N) / 1000000 )); }
first=(); second=()
for i in $(seq 1 "$RUNS"); do
  rm -rf "$work/tree"; sync
  t0=$(ms); "$AGENT" apply "$work/resources.json" > "$work/out1.json"; t1=$(ms)
  "$AGENT" apply "$work/resources.json" > "$work/out2.json"; t2=$(ms)
  grep -q '"changed": 1001' "$work/out1.json" || die "first pass did not change 1001 resources"
  grep -q '"changed": 0' "$work/out2.json" || die "second pass changed something"
  first+=($((t1 - t0))); second+=($((t2 - t1)))
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "apply 1,000 files, first pass: median $(median "${first[@]}") ms over $RUNS runs (${first[*]})"
echo "apply 1,000 files, second pass (no change): median $(median "${second[@]}") ms over $RUNS runs (${second[*]})"
