#!/usr/bin/env bash
# postgres: the Postgres accelerator against PgBouncer and a direct connection.
#
# One throwaway Postgres cluster (pgbench -i) is the origin for everything. pgbench
# drives, in turn and on the same machine:
#   direct        straight to Postgres
#   pgbouncer     PgBouncer in transaction mode (Debian package), pool of POOL_SIZE
#   cordon        `cordon serve`'s wire-protocol proxy, pool of POOL_SIZE, cache off
#   cordon-cache  the same proxy and origin, cache on
# with three workloads:
#   select        pgbench -S -c CLIENTS        (select-only, persistent connections)
#   connect       pgbench -S -C -c CLIENTS     (a new connection per transaction, as
#                                               serverless code behaves)
#   many-clients  pgbench -S -c MANY_CLIENTS   (thousands of clients held on POOL_SIZE
#                                               origin connections; not run direct)
#   hot           like select, but over HOT_ROWS accounts only (a read-mostly working set
#                 that fits a cache, as in most web applications)
# and prints tps and p99 latency for each, with the ratios against PgBouncer.
# Clients authenticate with SCRAM-SHA-256 everywhere.
#
# Then the worker binding: the tests/guests/bindings worker runs one point query
# (`SELECT abalance FROM pgbench_accounts WHERE aid = $1`) per HTTP request through
# `cordon:postgres`, once against the cached database (every request after the first
# is a cache hit) and once against the uncached one; wrk reports the latency of each.
#
# Usage: bench/postgres/run.sh          (from any directory; as root or a sudoer)
#
# Environment:
#   DURATION=15         seconds per pgbench run
#   CLIENTS=50          pgbench -c for select and connect
#   MANY_CLIENTS=5000   pgbench -c for many-clients
#   POOL_SIZE=20        origin connections for PgBouncer and Cordon
#   SCALE=10            pgbench -i -s
#   HOT_ROWS=1000       accounts read by the hot workload
#   WORKLOADS="select connect many-clients hot"
#   TARGETS="direct pgbouncer cordon cordon-cache"
#   BINDING_DURATION=10s  wrk duration per binding run (BINDING=0 skips that part)
#   SKIP_BUILD=0        1: reuse target/release/cordon and the bindings guest
#   KEEP_TMP=0          1: keep the temp dir (configs, logs, latency logs)
set -euo pipefail

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-50}
MANY_CLIENTS=${MANY_CLIENTS:-5000}
POOL_SIZE=${POOL_SIZE:-20}
SCALE=${SCALE:-10}
HOT_ROWS=${HOT_ROWS:-1000}
WORKLOADS=${WORKLOADS:-"select connect many-clients hot"}
TARGETS=${TARGETS:-"direct pgbouncer cordon cordon-cache"}
SKIP_BUILD=${SKIP_BUILD:-0}
BINDING=${BINDING:-1}
BINDING_DURATION=${BINDING_DURATION:-10s}
KEEP_TMP=${KEEP_TMP:-0}

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$REPO_ROOT/bench/results"
# shellcheck source=../../scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"
BENCH_NAME=postgres
# shellcheck source=../lib.sh
source "$REPO_ROOT/bench/lib.sh"

ensure_postgres
if ! command -v pgbouncer >/dev/null 2>&1 && [[ ! -x /usr/sbin/pgbouncer ]]; then
    log "installing pgbouncer (Debian package)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null
    # The package may start its own instance; this benchmark runs its own.
    as_root systemctl stop pgbouncer >/dev/null 2>&1 || true
fi
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
PGBIN=$(dirname "$(command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
PGBENCH=$(command -v pgbench || echo "$PGBIN/pgbench")
for tool in python3 "$PGBENCH" "$PGBIN/pg_ctl"; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found"
done

# pgbench opens one socket per client, Cordon and PgBouncer one per client and
# per origin connection.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(( $(ulimit -n) > MANY_CLIENTS * 2 + 100 )) || log "warning: ulimit -n $(ulimit -n) is low for MANY_CLIENTS=$MANY_CLIENTS"

if [[ $SKIP_BUILD != 1 ]]; then
    log "building cordon (release)"
    (cd "$REPO_ROOT" && cargo build --release -q -p cordon)
    if [[ $BINDING == 1 ]]; then
        (cd "$REPO_ROOT/tests/guests/bindings" && cargo build --release -q --target wasm32-wasip2 --target-dir "$REPO_ROOT/target/guests")
    fi
fi
BINDINGS_WASM="$REPO_ROOT/target/guests/wasm32-wasip2/release/bindings.wasm"
[[ $BINDING != 1 || -f $BINDINGS_WASM ]] || die "$BINDINGS_WASM not found; build it or unset SKIP_BUILD"
[[ $BINDING != 1 ]] || command -v wrk >/dev/null 2>&1 || die "'wrk' not found (Debian: apt-get install -y wrk)"
CORDON="$REPO_ROOT/target/release/cordon"
[[ -x $CORDON ]] || die "$CORDON not found; build it or unset SKIP_BUILD"

# Postgres and PgBouncer refuse to run as root; they run as `postgres` then.
RUN_AS=()
if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (Debian's postgresql package creates it)"
    RUN_AS=(runuser -u postgres --)
fi

TMP_DIR=$(mktemp -d /tmp/pgbench-cordon.XXXXXX)
chmod 0755 "$TMP_DIR"
declare -a PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -d $TMP_DIR/pgdata ]]; then
        "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$TMP_DIR/pgdata" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [[ $KEEP_TMP == 1 || $rc != 0 ]]; then log "temp dir kept: $TMP_DIR"; else rm -rf -- "$TMP_DIR"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r PG_PORT BOUNCER_PORT PROXY_PORT HTTP_PORT ADMIN_PORT < <(free_ports 5)
ORIGIN_PASSWORD="origin-$RANDOM$RANDOM"
CLIENT_PASSWORD="client-$RANDOM$RANDOM"

# ---------------------------------------------------------------------------
# The origin.
log "initdb and start Postgres on port $PG_PORT"
mkdir -p "$TMP_DIR/pgdata" "$TMP_DIR/sock"
# The servers write their logs here too.
[[ ${#RUN_AS[@]} -gt 0 ]] && chown postgres "$TMP_DIR" "$TMP_DIR/pgdata" "$TMP_DIR/sock"
printf '%s\n' "$ORIGIN_PASSWORD" >"$TMP_DIR/pwfile"
chmod 0644 "$TMP_DIR/pwfile"
"${RUN_AS[@]}" "$PGBIN/initdb" -D "$TMP_DIR/pgdata" -U postgres --pwfile="$TMP_DIR/pwfile" \
    --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --no-instructions >"$TMP_DIR/initdb.log" 2>&1 \
    || { cat "$TMP_DIR/initdb.log" >&2; die "initdb failed"; }
cat >>"$TMP_DIR/pgdata/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP_DIR/sock'
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
EOF
"${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$TMP_DIR/pgdata" -l "$TMP_DIR/postgres.log" -w start >/dev/null
export PGPASSWORD=$ORIGIN_PASSWORD
"$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$TMP_DIR/pgbench-init.log" 2>&1 \
    || { tail "$TMP_DIR/pgbench-init.log" >&2; die "pgbench -i failed"; }

# ---------------------------------------------------------------------------
# PgBouncer, transaction mode, SCRAM for clients.
# PgBouncer's auth file holds the client password itself, its usual setup; it derives the
# SCRAM keys at each login, where Cordon derives them once at startup.
cat >"$TMP_DIR/userlist.txt" <<EOF
"bench" "$CLIENT_PASSWORD"
EOF
cat >"$TMP_DIR/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=postgres user=postgres password=$ORIGIN_PASSWORD
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $TMP_DIR/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $((MANY_CLIENTS + 100))
max_db_connections = $POOL_SIZE
logfile = $TMP_DIR/pgbouncer.log
pidfile = $TMP_DIR/pgbouncer.pid
EOF
chmod 0644 "$TMP_DIR/pgbouncer.ini" "$TMP_DIR/userlist.txt"
# Started here so that it inherits the raised open-files limit; it drops to `postgres` itself.
if [[ ${#RUN_AS[@]} -gt 0 ]]; then
    "$PGBOUNCER" -u postgres "$TMP_DIR/pgbouncer.ini" >"$TMP_DIR/pgbouncer.out" 2>&1 &
else
    "$PGBOUNCER" "$TMP_DIR/pgbouncer.ini" >"$TMP_DIR/pgbouncer.out" 2>&1 &
fi
PIDS+=($!)

# ---------------------------------------------------------------------------
# Cordon: two databases on the same origin, one with the cache off, one on.
mkdir -p "$TMP_DIR/cordon-data"
cat >"$TMP_DIR/cordon.toml" <<EOF
[server]
listen = "127.0.0.1:$HTTP_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
data_dir = "$TMP_DIR/cordon-data"

[postgres_proxy]
listen = "127.0.0.1:$PROXY_PORT"
EOF
for db in nocache cached; do
    if [[ $db == cached ]]; then cache="enabled = true
max_age_s = 60
max_bytes = 268435456"; else cache="enabled = false"; fi
    cat >>"$TMP_DIR/cordon.toml" <<EOF

[[database]]
name = "$db"
tenant = "bench"
origin = "postgres://postgres@127.0.0.1:$PG_PORT/postgres"
origin_password_env = "ORIGIN_PASSWORD"
pool_size = $POOL_SIZE
# Both databases are one tenant's on one origin: let each fill its pool.
tenant_origin_connections = $((POOL_SIZE * 2))
max_client_connections = $((MANY_CLIENTS + 100))
max_waiting_clients = $((MANY_CLIENTS + 100))
acquire_timeout_ms = 30000
[[database.users]]
name = "bench"
password_env = "CLIENT_PASSWORD"
[database.cache]
$cache
EOF
done
if [[ $BINDING == 1 ]]; then
    for db in cached nocache; do
        cat >>"$TMP_DIR/cordon.toml" <<EOF

[[worker]]
name = "pg-$db"
tenant = "bench"
component = "$BINDINGS_WASM"
routes = ["$db.localhost/"]
[[worker.kv]]
binding = "KV"
namespace = "bench"
[[worker.sql]]
binding = "DB"
database = "bench"
[[worker.postgres]]
binding = "PG"
database = "$db"
[worker.vars]
BENCH = "postgres"
EOF
    done
fi
ORIGIN_PASSWORD=$ORIGIN_PASSWORD CLIENT_PASSWORD=$CLIENT_PASSWORD RUST_LOG=warn \
    "$CORDON" serve --config "$TMP_DIR/cordon.toml" >"$TMP_DIR/cordon.log" 2>&1 &
PIDS+=($!)

wait_port() {
    local port=$1 name=$2
    for _ in $(seq 300); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    tail -n 30 "$TMP_DIR/$name.log" "$TMP_DIR/$name.out" 2>/dev/null >&2 || true
    die "$name is not listening on port $port"
}
wait_port "$BOUNCER_PORT" pgbouncer
wait_port "$PROXY_PORT" cordon

# ---------------------------------------------------------------------------
# Runs.
target_args() {
    case $1 in
        direct) echo "-h 127.0.0.1 -p $PG_PORT -U postgres postgres" ;;
        pgbouncer) echo "-h 127.0.0.1 -p $BOUNCER_PORT -U bench bench" ;;
        cordon) echo "-h 127.0.0.1 -p $PROXY_PORT -U bench nocache" ;;
        cordon-cache) echo "-h 127.0.0.1 -p $PROXY_PORT -U bench cached" ;;
    esac
}
target_password() {
    case $1 in direct) echo "$ORIGIN_PASSWORD" ;; *) echo "$CLIENT_PASSWORD" ;; esac
}

RESULTS="$TMP_DIR/results.tsv"
: >"$RESULTS"
for workload in $WORKLOADS; do
    for target in $TARGETS; do
        case $workload in
            select) flags=(-S -c "$CLIENTS") ;;
            connect) flags=(-S -C -c "$CLIENTS") ;;
            many-clients)
                [[ $target == direct ]] && continue
                # pgbench counts the time its clients take to connect (each one a SCRAM
                # login) against -T, so this run is longer.
                flags=(-S -c "$MANY_CLIENTS") ;;
            hot)
                printf '\\set aid random(1, %d)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' "$HOT_ROWS" >"$TMP_DIR/hot.sql"
                flags=(-f "$TMP_DIR/hot.sql" -c "$CLIENTS") ;;
            *) die "unknown workload '$workload'" ;;
        esac
        prefix="$TMP_DIR/lat-$workload-$target"
        duration=$DURATION
        [[ $workload == many-clients ]] && duration=$((DURATION + MANY_CLIENTS / 100))
        log "$workload via $target: pgbench ${flags[*]} -j 2 -T $duration"
        # shellcheck disable=SC2046
        if ! PGPASSWORD=$(target_password "$target") "$PGBENCH" -n "${flags[@]}" -j 2 -T "$duration" \
            -l --log-prefix="$prefix" $(target_args "$target") >"$prefix.out" 2>&1; then
            tail -n 5 "$prefix.out" >&2
            log "$workload via $target failed"
            printf '%s\t%s\tfailed\t-\n' "$workload" "$target" >>"$RESULTS"
            continue
        fi
        python3 - "$workload" "$target" "$prefix" "$prefix.out" >>"$RESULTS" <<'EOF'
import glob, re, sys
workload, target, prefix, out = sys.argv[1:5]
text = open(out).read()
m = re.search(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing|including connections establishing)?", text)
tps = float(m.group(1)) if m else float("nan")
lat = []
for path in glob.glob(prefix + ".*"):
    if path.endswith(".out"):
        continue
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                lat.append(int(parts[2]))
lat.sort()
p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000.0 if lat else float("nan")
print(f"{workload}\t{target}\t{tps:.0f}\t{p99:.2f}")
EOF
        tail -n 1 "$RESULTS" >&2
        rm -f "$prefix".[0-9]* 2>/dev/null || true
    done
done

# ---------------------------------------------------------------------------
# The worker binding: latency of one point query per HTTP request.
BINDING_RESULTS="$TMP_DIR/binding.tsv"
: >"$BINDING_RESULTS"
if [[ $BINDING == 1 ]]; then
    cat >"$TMP_DIR/pg.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"sql": "SELECT abalance FROM pgbench_accounts WHERE aid = $1", "params": [4242]}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
    io.write(string.format("RESULT\t%d\t%.1f\t%.1f\t%.1f\n", summary.requests, summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99)))
end
EOF
    for db in cached nocache; do
        url="http://127.0.0.1:$HTTP_PORT/pg?binding=PG"
        reply=$(curl -sS -H "Host: $db.localhost" -H 'Content-Type: application/json' \
            --data-binary '{"sql": "SELECT abalance FROM pgbench_accounts WHERE aid = $1", "params": [4242]}' "$url")
        [[ $reply == *rows* ]] || die "the binding worker answered: $reply"
        log "binding via $db: wrk -c 8 -t 2 -d $BINDING_DURATION"
        wrk -c 8 -t 2 -d "$BINDING_DURATION" -H "Host: $db.localhost" -s "$TMP_DIR/pg.lua" "$url" >"$TMP_DIR/wrk-$db.out"
        line=$(grep '^RESULT' "$TMP_DIR/wrk-$db.out" | tail -n 1)
        printf 'binding-%s\t%s\n' "$db" "${line#RESULT$'\t'}" >>"$BINDING_RESULTS"
        tail -n 1 "$BINDING_RESULTS" >&2
    done
fi

# ---------------------------------------------------------------------------
# Report.
mkdir -p "$RESULTS_DIR"
REPORT="$RESULTS_DIR/postgres-$(date -u +%Y%m%dT%H%M%SZ).txt"
python3 - "$RESULTS" "$CLIENTS" "$MANY_CLIENTS" "$POOL_SIZE" "$DURATION" <<'EOF' | tee "$REPORT"
import sys
path, clients, many, pool, duration = sys.argv[1:6]
rows = {}
order = []
for line in open(path):
    w, t, tps, p99 = line.rstrip("\n").split("\t")
    rows[(w, t)] = (tps, p99)
    if w not in order:
        order.append(w)
print(f"pgbench -S, -j 2, {duration}s per run; clients {clients} (many-clients: {many}); pool {pool} for PgBouncer and Cordon")
print(f"{'workload':<14}{'target':<14}{'tps':>10}{'p99 ms':>10}{'tps vs PgBouncer':>18}")
for w in order:
    base = rows.get((w, "pgbouncer"), ("failed", "-"))[0]
    for (ww, t), (tps, p99) in rows.items():
        if ww != w:
            continue
        try:
            ratio = f"{float(tps) / float(base):.2f}x"
        except ValueError:
            ratio = "-"
        print(f"{w:<14}{t:<14}{tps:>10}{p99:>10}{ratio:>18}")
EOF
if [[ -s $BINDING_RESULTS ]]; then
    {
        echo
        echo "worker binding, one point query per HTTP request (wrk -c 8 -t 2, $BINDING_DURATION; latency includes the HTTP round trip and a fresh instance)"
        printf '%-18s%12s%10s%10s\n' target 'req/s' 'p50 us' 'p99 us'
        while IFS=$'\t' read -r name requests rps p50 p99; do
            printf '%-18s%12s%10s%10s\n' "$name" "$rps" "$p50" "$p99"
        done <"$BINDING_RESULTS"
    } | tee -a "$REPORT"
fi
log "report: $REPORT"
