# Shared by deploy/*.sh: install and start what comodit needs on Debian/Ubuntu.
# Sourced, not run. Every function is idempotent: it does nothing when the thing is already there.

set -euo pipefail

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Fails early, with the numbers, when the disk holding $1 has less than $2 GiB free: a full disk
# otherwise shows up as rustc crashing halfway through the build with no word about space.
ensure_free_disk() {
  local dir=$1 need_gib=$2 avail_kib
  avail_kib=$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')
  if [ "${avail_kib:-0}" -lt $((need_gib * 1024 * 1024)) ]; then
    die "only $((avail_kib / 1024)) MiB free on the disk of $dir; building and testing comodit needs about ${need_gib} GiB (an old target/ or clone may hold it)"
  fi
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

APT_UPDATED=""
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The Rust toolchain: the machine's rustup one, or Debian's cargo as a fallback.
ensure_rust() {
  if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null || apt_install cargo rustc
  # The dependencies need a recent Rust (1.85+); Debian 12's packaged cargo is older.
  local minor
  minor=$(cargo --version | sed -E 's/^cargo 1\.([0-9]+).*/\1/')
  if [ "${minor:-0}" -lt 85 ]; then
    die "cargo $(cargo --version) is too old: install Rust 1.85 or newer with rustup (https://rustup.rs), then re-run"
  fi
  command -v cc >/dev/null || apt_install gcc libc6-dev
  command -v pkg-config >/dev/null || apt_install pkg-config
}

rabbitmq_up() { as_root rabbitmqctl -q await_startup --timeout 2 >/dev/null 2>&1; }

# Broker settings for tens of thousands of host queues (ARCHITECTURE §22): the management plugin's
# statistics collectors, whose work grows with every queue, were the broker's largest cost, and
# nothing in comodit reads those statistics (queue counts come from `rabbitmqctl list_queues`).
# A file of RabbitMQ's conf.d, read at start: a broker already running keeps its settings until it
# restarts.
RABBITMQ_CONF=/etc/rabbitmq/conf.d/10-comodit.conf
RABBITMQ_CONF_TEXT='# Written by comodit deploy/common.sh (ARCHITECTURE.md §22).
management_agent.disable_metrics_collector = true
collect_statistics_interval = 30000'
# What conf.d cannot say (no rabbitmq.conf key exists for it) goes in advanced.config: 16 workers for
# definitions imports instead of one per core. Each imported user and permission is a Mnesia
# transaction that waits for the broker's log to reach the disk; with two workers a crowd of 2,000
# new hosts took 4 s to import, with sixteen the fsyncs are shared (ARCHITECTURE §21). Written only
# when the file is absent or ours: an operator's own advanced.config is left alone, with a warning.
RABBITMQ_ADVANCED=/etc/rabbitmq/advanced.config
RABBITMQ_ADVANCED_TEXT='%% Written by comodit deploy/common.sh (ARCHITECTURE.md §21).
[{rabbit, [{definition_import_work_pool_size, 16}]}].'

# RabbitMQ from the distribution, with the management and event-exchange plugins, started with a
# raised open-files limit (thousands of queues starve the default 1,024; DESIGN §5).
ensure_rabbitmq() {
  # Written before the package is installed, so the broker its installation starts reads it.
  if [ "$(cat "$RABBITMQ_CONF" 2>/dev/null)" != "$RABBITMQ_CONF_TEXT" ]; then
    as_root mkdir -p "$(dirname "$RABBITMQ_CONF")"
    printf '%s\n' "$RABBITMQ_CONF_TEXT" | as_root tee "$RABBITMQ_CONF" >/dev/null
    if command -v rabbitmqctl >/dev/null && rabbitmq_up; then
      log "$RABBITMQ_CONF written: it applies when rabbitmq next restarts"
    fi
  fi
  local advanced
  advanced=$(cat "$RABBITMQ_ADVANCED" 2>/dev/null || true)
  if [ "$advanced" != "$RABBITMQ_ADVANCED_TEXT" ]; then
    if [ -z "$advanced" ] || [[ "$advanced" == "%% Written by comodit"* ]]; then
      as_root mkdir -p "$(dirname "$RABBITMQ_ADVANCED")"
      printf '%s\n' "$RABBITMQ_ADVANCED_TEXT" | as_root tee "$RABBITMQ_ADVANCED" >/dev/null
      if command -v rabbitmqctl >/dev/null && rabbitmq_up; then
        log "$RABBITMQ_ADVANCED written: it applies when rabbitmq next restarts"
      fi
    else
      log "$RABBITMQ_ADVANCED is not comodit's: add {definition_import_work_pool_size, 16} to its rabbit section for fast enrollment"
    fi
  fi
  apt_install rabbitmq-server curl
  as_root rabbitmq-plugins --offline -q enable rabbitmq_management rabbitmq_event_exchange >/dev/null
  if rabbitmq_up; then
    # Plugins enabled offline need a running node to pick them up.
    as_root rabbitmq-plugins -q enable rabbitmq_management rabbitmq_event_exchange >/dev/null
    return 0
  fi
  log "starting rabbitmq"
  if [ -d /run/systemd/system ]; then
    as_root systemctl start rabbitmq-server
  else
    # No systemd (containers, CI sandboxes): start the node directly, dropping to
    # the rabbitmq user by setpriv, which (unlike su) keeps the raised open-files limit.
    as_root mkdir -p /var/log/rabbitmq
    as_root chown rabbitmq:rabbitmq /var/log/rabbitmq
    as_root bash -c 'want=65536; hard=$(ulimit -Hn); [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ] && want=$hard
      ulimit -n "$want"; cd /var/lib/rabbitmq
      setsid setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env HOME=/var/lib/rabbitmq \
        /usr/lib/rabbitmq/bin/rabbitmq-server >>/var/log/rabbitmq/comodit-start.log 2>&1 < /dev/null &'
  fi
  local i
  for i in $(seq 1 120); do
    rabbitmq_up && break
    sleep 1
  done
  rabbitmq_up || die "rabbitmq did not start; see /var/log/rabbitmq/"
  log "rabbitmq is up ($(as_root rabbitmqctl -q status 2>/dev/null | grep -A2 'File Descriptors' | grep -o 'limit: [0-9]*' | head -n1) open files)"
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 -t 2 >/dev/null 2>&1; }

# PostgreSQL from the distribution, for the PostgreSQL store backend's tests: started (without
# systemd when systemd is not running), answering on 127.0.0.1:5432, with a role `comodit`
# (password `comodit`, CREATEDB) that the tests use to create and drop throw-away databases.
ensure_postgres() {
  apt_install postgresql
  local version
  version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
  [ -n "$version" ] || die "postgresql is installed but /usr/lib/postgresql is empty"
  # Debian creates the `main` cluster on install unless told not to (create_main_cluster = false).
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$version main"; then
    log "creating postgresql cluster $version/main"
    as_root pg_createcluster "$version" main >/dev/null
  fi
  if ! pg_up; then
    log "starting postgresql $version"
    if [ -d /run/systemd/system ]; then
      as_root systemctl start "postgresql@${version}-main"
    else
      # pg_ctlcluster runs pg_ctl as the cluster's owner; the server detaches by itself.
      as_root pg_ctlcluster "$version" main start
    fi
    local i
    for i in $(seq 1 60); do
      pg_up && break
      sleep 1
    done
    pg_up || die "postgresql did not start; see /var/log/postgresql/postgresql-${version}-main.log"
  fi
  # Idempotent: creates the role, or resets its password and rights.
  as_root runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'comodit') THEN
    CREATE ROLE comodit LOGIN CREATEDB PASSWORD 'comodit';
  ELSE
    ALTER ROLE comodit LOGIN CREATEDB PASSWORD 'comodit';
  END IF;
END
$$;
SQL
  log "postgresql $version is up on 127.0.0.1:5432 (role comodit)"
}
