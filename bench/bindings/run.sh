#!/usr/bin/env bash
# bindings: capability calls issued from a worker. The same three operations
# (key-value GET, key-value PUT, SQL point query) are served by Cordon, where
# the tests/guests/bindings guest calls its kv and sql bindings, and by a
# native hyper + SQLite server with the same storage settings; wrk measures
# each in alternating rounds and the ratios are printed.
#
# Usage: bench/bindings/run.sh          (from any directory)
#
# Environment:
#   ROUNDS=3            measured rounds per server and workload (medians are reported)
#   DURATION=10s        wrk duration of one measured run
#   CONNECTIONS=32      wrk -c
#   THREADS=2           wrk -t
#   WARMUP=3s           wrk duration of the discarded warm-up run per server and workload
#   WORKLOADS="kv-get kv-put sql-select"
#                       the workloads to run, in this order within a round
#   VALUE_BYTES=64      length of the value read by kv-get and written by kv-put
#   SQL_ROWS=1000       rows in the table that sql-select reads
#   SQL_ID=500          the primary key sql-select looks up (1..SQL_ROWS)
#   DATA_PARENT         directory under which both servers keep their SQLite
#                       files (default: the temp dir); its file system sets
#                       the cost of kv-put's fsync
#   SKIP_CORDON=0       1: measure the native server only (no cordon or guest build)
#   SKIP_BUILD=0        1: reuse the existing release binaries and bindings.wasm
#   READY_TIMEOUT=60    seconds to wait for each server to come up
#   CORDON_LOG=warn     RUST_LOG for the cordon process
#   KEEP_TMP=0          1: keep the temp dir (configs, logs, raw wrk output, data)
#   CORDON_BIN, BINDINGS_WASM
#                       override the cordon binary / guest component to serve
#                       (defaults: target/release/cordon,
#                       target/guests/wasm32-wasip2/release/bindings.wasm)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-3s}
WORKLOADS=${WORKLOADS:-"kv-get kv-put sql-select"}
VALUE_BYTES=${VALUE_BYTES:-64}
SQL_ROWS=${SQL_ROWS:-1000}
SQL_ID=${SQL_ID:-500}
DATA_PARENT=${DATA_PARENT:-}
SKIP_CORDON=${SKIP_CORDON:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
READY_TIMEOUT=${READY_TIMEOUT:-60}
CORDON_LOG=${CORDON_LOG:-warn}
KEEP_TMP=${KEEP_TMP:-0}

CALLER_DIR=$PWD
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$REPO_ROOT/bench/results"
PARSE="$REPO_ROOT/bench/http-hello/parse_wrk.py"

# Every request carries this Host header: Cordon routes on it ("localhost/"),
# the native server ignores it, so both see byte-identical requests.
HOST_HEADER="localhost"
# The grants' binding names, as the guest opens them; the native server
# ignores the binding parameter.
KV_BINDING="KV"
SQL_BINDING="DB"
GET_KEY="bench-get"
PUT_KEY="bench-put"

BENCH_NAME=bindings
# shellcheck source=../lib.sh
source "$REPO_ROOT/bench/lib.sh"

is_uint "$ROUNDS" || die "ROUNDS must be a positive integer (got '$ROUNDS')"
is_uint "$CONNECTIONS" || die "CONNECTIONS must be a positive integer (got '$CONNECTIONS')"
is_uint "$THREADS" || die "THREADS must be a positive integer (got '$THREADS')"
is_uint "$READY_TIMEOUT" || die "READY_TIMEOUT must be a positive integer (got '$READY_TIMEOUT')"
is_uint "$VALUE_BYTES" || die "VALUE_BYTES must be a positive integer (got '$VALUE_BYTES')"
is_uint "$SQL_ROWS" || die "SQL_ROWS must be a positive integer (got '$SQL_ROWS')"
is_uint "$SQL_ID" || die "SQL_ID must be a positive integer (got '$SQL_ID')"
(( THREADS <= CONNECTIONS )) || die "THREADS ($THREADS) must not exceed CONNECTIONS ($CONNECTIONS)"
(( SQL_ID <= SQL_ROWS )) || die "SQL_ID ($SQL_ID) must be at most SQL_ROWS ($SQL_ROWS)"
# kv-put values start with a unique `t<thread>-<n>-`, and the whole request
# target has to fit Cordon's default max_header_bytes (16 KiB).
(( VALUE_BYTES >= 24 && VALUE_BYTES <= 8192 )) || die "VALUE_BYTES must be between 24 and 8192 (got $VALUE_BYTES)"

read -r -a WORKLOAD_LIST <<<"$WORKLOADS"
(( ${#WORKLOAD_LIST[@]} > 0 )) || die "WORKLOADS is empty"
for w in "${WORKLOAD_LIST[@]}"; do
    case $w in
        kv-get | kv-put | sql-select) ;;
        *) die "unknown workload '$w' (known: kv-get kv-put sql-select)" ;;
    esac
done

require_tools cargo curl python3 wrk

# --------------------------------------------------------------------------
# Process bookkeeping: everything started here is stopped on exit.

make_tmp_dir
if [[ -n $DATA_PARENT ]]; then
    [[ $DATA_PARENT == /* ]] || DATA_PARENT="$CALLER_DIR/$DATA_PARENT"
    [[ -d $DATA_PARENT ]] || die "DATA_PARENT '$DATA_PARENT' is not a directory"
    DATA_ROOT=$(mktemp -d "$DATA_PARENT/bindings-data.XXXXXX")
else
    DATA_ROOT="$TMP_DIR/data"
fi
track_processes

# With DATA_PARENT the data dir is not inside the temp dir: it is kept or
# removed with it.
on_cleanup() {
    if [[ $1 == 1 ]]; then
        [[ $DATA_ROOT == "$TMP_DIR"/* ]] || log "data dir kept: $DATA_ROOT"
    else
        [[ $DATA_ROOT == "$TMP_DIR"/* ]] || rm -rf -- "$DATA_ROOT"
    fi
}

# call NAME TARGET [JSON-BODY]: one request (GET, or POST with the body) to
# server NAME; prints the response body, fails unless it answers 200.
call() {
    local name=$1 target=$2 body=${3-} out="$TMP_DIR/$1.call" code
    local args=(-sS -o "$out" -w '%{http_code}' --max-time 10 -H "Host: $HOST_HEADER")
    if [[ $# -ge 3 ]]; then
        args+=(-X POST -H 'Content-Type: application/json' --data-binary "$body")
    fi
    code=$(curl "${args[@]}" "${BASE[$name]}$target") || {
        show_log "$TMP_DIR/$name.log"
        die "$name: request to $target failed"
    }
    if [[ $code != 200 ]]; then
        log "$name answered HTTP $code to $target; body:"
        head -c 2000 "$out" >&2 || true
        echo >&2
        show_log "$TMP_DIR/$name.log"
        die "$name does not answer 200 to $target"
    fi
    cat "$out"
}

# expect NAME WHAT ACTUAL EXPECTED
expect() {
    [[ $3 == "$4" ]] || die "$1: $2 answered '$(head -c 300 <<<"$3")', expected '$(head -c 300 <<<"$4")'"
}

# --------------------------------------------------------------------------
# Build.

cd "$REPO_ROOT"

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
CORDON_BIN=${CORDON_BIN:-"$TARGET_DIR/release/cordon"}
NATIVE_BIN="$TARGET_DIR/release/bindings-native"
GUEST_MANIFEST="$REPO_ROOT/tests/guests/bindings/Cargo.toml"
BINDINGS_WASM=${BINDINGS_WASM:-"$TARGET_DIR/guests/wasm32-wasip2/release/bindings.wasm"}
[[ $CORDON_BIN == /* ]] || CORDON_BIN="$CALLER_DIR/$CORDON_BIN"
[[ $BINDINGS_WASM == /* ]] || BINDINGS_WASM="$CALLER_DIR/$BINDINGS_WASM"

SERVERS=()
[[ $SKIP_CORDON == 1 ]] || SERVERS+=(cordon)
SERVERS+=(native)

if [[ $SKIP_BUILD != 1 ]]; then
    packages=(-p bindings-native)
    [[ $SKIP_CORDON == 1 ]] || packages=(-p cordon "${packages[@]}")
    log "cargo build --release ${packages[*]}"
    cargo build --release "${packages[@]}"

    if [[ $SKIP_CORDON != 1 ]]; then
        log "building the guest: tests/guests/bindings (wasm32-wasip2)"
        cargo build --release --target wasm32-wasip2 --manifest-path "$GUEST_MANIFEST" \
            --target-dir "$TARGET_DIR/guests" \
            || die "building the guest failed (is the target installed? rustup target add wasm32-wasip2)"
    fi
fi

[[ -x $NATIVE_BIN ]] || die "missing $NATIVE_BIN (run without SKIP_BUILD=1)"
if [[ $SKIP_CORDON != 1 ]]; then
    [[ -x $CORDON_BIN ]] || die "missing $CORDON_BIN (run without SKIP_BUILD=1)"
    [[ -f $BINDINGS_WASM ]] || die "missing $BINDINGS_WASM (run without SKIP_BUILD=1)"
fi

# --------------------------------------------------------------------------
# Start the servers.

read -r CORDON_PORT CORDON_ADMIN_PORT NATIVE_PORT < <(free_ports 3)
declare -A BASE=(
    [cordon]="http://127.0.0.1:$CORDON_PORT"
    [native]="http://127.0.0.1:$NATIVE_PORT"
)
HEALTH_URL="http://127.0.0.1:$CORDON_ADMIN_PORT/health"

# Cordon refuses a data directory that others can write.
mkdir -p "$DATA_ROOT"
chmod 700 "$DATA_ROOT"
mkdir -m 700 "$DATA_ROOT/cordon" "$DATA_ROOT/native"

if [[ $SKIP_CORDON != 1 ]]; then
    # The guest imports kv, sql, postgres and wasi:config, so the worker
    # needs all four grants; the variable is never read, and the Postgres
    # origin is never dialed (the benchmark does not call it).
    cat >"$TMP_DIR/cordon.toml" <<EOF
[server]
listen = "127.0.0.1:$CORDON_PORT"
admin_listen = "127.0.0.1:$CORDON_ADMIN_PORT"
data_dir = "$DATA_ROOT/cordon"

[[worker]]
name = "bindings"
tenant = "bench"
component = "$BINDINGS_WASM"
routes = ["$HOST_HEADER/"]

[[worker.kv]]
binding = "$KV_BINDING"
namespace = "bench"

[[worker.sql]]
binding = "$SQL_BINDING"
database = "bench"

[[worker.postgres]]
binding = "PG"
database = "bench"

[worker.vars]
BENCH = "bindings"

[[database]]
name = "bench"
tenant = "bench"
origin = "postgres://bench@127.0.0.1:1/bench"
EOF
    start cordon "$TMP_DIR/cordon.log" \
        env RUST_LOG="$CORDON_LOG" "$CORDON_BIN" serve --config "$TMP_DIR/cordon.toml"
fi

start native "$TMP_DIR/native.log" "$NATIVE_BIN" "127.0.0.1:$NATIVE_PORT" "$DATA_ROOT/native"

if [[ $SKIP_CORDON != 1 ]]; then
    wait_http cordon "$HEALTH_URL" "$HOST_HEADER"
    log "cordon admin ready: $HEALTH_URL"
fi
wait_http native "${BASE[native]}/" "$HOST_HEADER"

# --------------------------------------------------------------------------
# Pre-populate and check: the same requests to both servers.

# pad PREFIX: PREFIX followed by `v` up to VALUE_BYTES.
pad() {
    local s=$1
    while (( ${#s} < VALUE_BYTES )); do s+=v; done
    printf '%s' "${s:0:VALUE_BYTES}"
}
GET_VALUE=$(pad "bench-get-value-")
GET_TARGET="/kv?binding=$KV_BINDING&op=get&key=$GET_KEY"
SQL_TARGET="/sql?binding=$SQL_BINDING"
SQL_SELECT="SELECT id, name, score FROM items WHERE id = ?"
# The wrk scripts read these.
export BINDINGS_PUT_PATH="/kv?binding=$KV_BINDING&op=set&key=$PUT_KEY&value="
export BINDINGS_VALUE_BYTES=$VALUE_BYTES
export BINDINGS_SQL_BODY="{\"sql\": \"$SQL_SELECT\", \"params\": [$SQL_ID]}"

declare -A WRK_TARGET=(
    [kv-get]="$GET_TARGET"
    [kv-put]="/"
    [sql-select]="$SQL_TARGET"
)
declare -A WRK_SCRIPT=(
    [kv-get]=""
    [kv-put]="$SCRIPT_DIR/kv-put.lua"
    [sql-select]="$SCRIPT_DIR/sql-select.lua"
)

for s in "${SERVERS[@]}"; do
    expect "$s" "kv set" "$(call "$s" "/kv?binding=$KV_BINDING&op=set&key=$GET_KEY&value=$GET_VALUE")" ok
    expect "$s" "kv get" "$(call "$s" "$GET_TARGET")" "$GET_VALUE"
    check_value=$(pad "check-")
    expect "$s" "kv set" "$(call "$s" "$BINDINGS_PUT_PATH$check_value")" ok
    expect "$s" "kv get" "$(call "$s" "/kv?binding=$KV_BINDING&op=get&key=$PUT_KEY")" "$check_value"

    call "$s" "$SQL_TARGET" \
        '{"sql": "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, score REAL NOT NULL)", "params": []}' \
        >/dev/null
    call "$s" "$SQL_TARGET" \
        "{\"sql\": \"INSERT OR REPLACE INTO items (id, name, score) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) SELECT i, 'item-' || i, i * 0.5 FROM n\", \"params\": [$SQL_ROWS]}" \
        >"$TMP_DIR/$s.insert.json"
    python3 - "$TMP_DIR/$s.insert.json" "$SQL_ROWS" <<'EOF' || die "$s: inserting the rows did not report $SQL_ROWS rows"
import json, sys
sys.exit(json.load(open(sys.argv[1])).get("rows_affected") != int(sys.argv[2]))
EOF
    call "$s" "$SQL_TARGET" "$BINDINGS_SQL_BODY" >"$TMP_DIR/$s.select.json"
    python3 - "$TMP_DIR/$s.select.json" "$SQL_ID" <<'EOF' || die "$s: the point query answered $(head -c 300 "$TMP_DIR/$s.select.json")"
import json, sys
i = int(sys.argv[2])
sys.exit(json.load(open(sys.argv[1])).get("rows") != [[i, f"item-{i}", i * 0.5]])
EOF
    log "$s OK: key $GET_KEY ($VALUE_BYTES bytes), key $PUT_KEY, table items ($SQL_ROWS rows) in place"
done

# --------------------------------------------------------------------------
# Cordon's own per-request statistics, from /health.

# health_snapshot: "requests instantiate_us_mean cpu_us_mean" of the
# bindings worker, or "n/a n/a n/a".
health_snapshot() {
    { curl -sS --max-time 5 "$HEALTH_URL" 2>/dev/null || true; } | python3 -c '
import json, sys
out = "n/a n/a n/a"
try:
    for w in json.load(sys.stdin).get("workers") or []:
        if isinstance(w, dict) and w.get("name") == "bindings":
            st = w.get("stats") or {}
            vals = [st.get("requests"), st.get("instantiate_us_mean"), st.get("cpu_us_mean")]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                out = " ".join(str(v) for v in vals)
except ValueError:
    pass
print(out)
' 2>/dev/null || echo "n/a n/a n/a"
}

# Sums over the measured cordon runs, per workload: requests, and requests
# times the mean (so that means over several runs can be combined).
declare -A STAT_N STAT_INST STAT_CPU
for w in "${WORKLOAD_LIST[@]}"; do STAT_N[$w]=0; STAT_INST[$w]=0; STAT_CPU[$w]=0; done
STATS_OK=1

# add_stats WORKLOAD BEFORE AFTER: adds the difference of two snapshots.
add_stats() {
    local w=$1 n1 i1 c1 n2 i2 c2
    read -r n1 i1 c1 <<<"$2"
    read -r n2 i2 c2 <<<"$3"
    if [[ $n1 == n/a || $n2 == n/a ]]; then
        STATS_OK=0
        return
    fi
    local sums
    sums=$(awk \
        -v n="${STAT_N[$w]}" -v i="${STAT_INST[$w]}" -v c="${STAT_CPU[$w]}" \
        -v n1="$n1" -v i1="$i1" -v c1="$c1" -v n2="$n2" -v i2="$i2" -v c2="$c2" \
        'BEGIN { printf "%d %.6f %.6f\n", n + n2 - n1, i + i2 * n2 - i1 * n1, c + c2 * n2 - c1 * n1 }')
    read -r n1 i1 c1 <<<"$sums"
    STAT_N[$w]=$n1
    STAT_INST[$w]=$i1
    STAT_CPU[$w]=$c1
}

# --------------------------------------------------------------------------
# Measure.

FS_INFO=$(df -T "$DATA_ROOT" 2>/dev/null | awk 'NR == 2 { print $2 " on " $1 }')
# The cost of one fsync on the data file system bounds kv-put: SQLite
# fsyncs the WAL on every commit, and commits to one file are serialised.
FSYNC_US=$(python3 - "$DATA_ROOT" <<'EOF' 2>/dev/null || echo "n/a"
import os, statistics, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
times = []
try:
    for _ in range(200):
        os.pwrite(fd, b"x" * 4096, 0)
        t = time.perf_counter()
        os.fsync(fd)
        times.append(time.perf_counter() - t)
finally:
    os.close(fd)
    os.unlink(path)
print(f"{statistics.median(times) * 1e6:.0f}")
EOF
)

note_load

log "warm-up: $WARMUP per server and workload"
for w in "${WORKLOAD_LIST[@]}"; do
    for s in "${SERVERS[@]}"; do
        run_wrk "$TMP_DIR/$s.$w.warmup.txt" "${BASE[$s]}${WRK_TARGET[$w]}" "$WARMUP" "${WRK_SCRIPT[$w]}"
    done
done

# Every round runs every workload against every server. The server that
# goes first rotates from round to round and from workload to workload, so
# slow drift of the machine (and the file system's state after a kv-put
# run) does not land on one of them.
n=${#SERVERS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < ${#WORKLOAD_LIST[@]}; k++)); do
        w=${WORKLOAD_LIST[$k]}
        for ((i = 0; i < n; i++)); do
            s=${SERVERS[$(((i + r + k - 1) % n))]}
            out="$TMP_DIR/$s.$w.round$r.txt"
            log "round $r/$ROUNDS: $w on $s (wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
            [[ $s != cordon ]] || before=$(health_snapshot)
            run_wrk "$out" "${BASE[$s]}${WRK_TARGET[$w]}" "$DURATION" "${WRK_SCRIPT[$w]}"
            [[ $s != cordon ]] || add_stats "$w" "$before" "$(health_snapshot)"
            read -r rps p99 non2xx sockerr < <("$PARSE" "$out") \
                || die "could not parse wrk output $out"
            log "  $rps ops/s, p99 $p99 ms, non-2xx $non2xx, socket errors $sockerr"
            alive "$s"
        done
    done
done

# --------------------------------------------------------------------------
# Report.

declare -A MED_RPS MED_P99 ERRS ROUND_RPS
for w in "${WORKLOAD_LIST[@]}"; do
    for s in "${SERVERS[@]}"; do
        files=()
        for ((r = 1; r <= ROUNDS; r++)); do files+=("$TMP_DIR/$s.$w.round$r.txt"); done
        read -r rps p99 non2xx sockerr < <("$PARSE" --median "${files[@]}") \
            || die "could not summarise wrk output for $w on $s"
        MED_RPS[$s.$w]=$rps
        MED_P99[$s.$w]=$p99
        ERRS[$s.$w]="$non2xx/$sockerr"
        ROUND_RPS[$s.$w]=$("$PARSE" "${files[@]}" | awk '{printf "%s%.0f", (NR > 1 ? " " : ""), $1}')
    done
done

# ratio TABLE WORKLOAD: cordon / native of MED_RPS or MED_P99.
ratio() {
    local -n table=$1
    local a=${table[cordon.$2]:-} b=${table[native.$2]:-}
    if [[ -z $a || -z $b ]]; then
        echo "n/a"
    else
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'
    fi
}

describe() {
    case $1 in
        kv-get) echo "GET  $GET_TARGET ($VALUE_BYTES-byte value)" ;;
        kv-put) echo "GET  ${BINDINGS_PUT_PATH}<new $VALUE_BYTES-byte value each request>" ;;
        sql-select) echo "POST $SQL_TARGET  $BINDINGS_SQL_BODY  ($SQL_ROWS rows)" ;;
    esac
}

CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo "none")
GIT_DIRTY=$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -c 1 || true)
STAMP=$(date -u '+%Y-%m-%dT%H:%M:%SZ')

render() {
    echo "bindings benchmark, $STAMP"
    echo "machine:  $(uname -sr), $(nproc) CPUs${CPU_MODEL:+, $CPU_MODEL}"
    echo "load avg: $LOAD_BEFORE (1/5/15 min, taken before the warm-up)"
    echo "git:      $GIT_REV${GIT_DIRTY:+ (with uncommitted changes)}"
    echo "load:     wrk --latency -t$THREADS -c$CONNECTIONS -d$DURATION, warm-up $WARMUP, $ROUNDS rounds (median shown)"
    echo "storage:  ${FS_INFO:-unknown file system}, median fsync of a 4 KiB write: $FSYNC_US us"
    echo "requests:"
    for w in "${WORKLOAD_LIST[@]}"; do
        printf '  %-11s %s\n' "$w" "$(describe "$w")"
    done
    echo
    printf '%-11s %-7s %10s %9s %10s  %s\n' "workload" "server" "ops/s" "p99 ms" "errors" "ops/s per round"
    for w in "${WORKLOAD_LIST[@]}"; do
        for s in cordon native; do
            if [[ -n ${MED_RPS[$s.$w]:-} ]]; then
                printf '%-11s %-7s %10.0f %9.2f %10s  %s\n' \
                    "$w" "$s" "${MED_RPS[$s.$w]}" "${MED_P99[$s.$w]}" "${ERRS[$s.$w]}" "${ROUND_RPS[$s.$w]}"
            else
                printf '%-11s %-7s %10s %9s %10s  %s\n' "$w" "$s" "skipped" "-" "-" "-"
            fi
        done
    done
    echo
    echo "errors = non-2xx responses / socket errors, summed over the rounds"
    echo
    printf '%-11s %14s %14s\n' "cordon/native" "ops/s ratio" "p99 ratio"
    for w in "${WORKLOAD_LIST[@]}"; do
        printf '%-11s %14s %14s\n' "$w" "$(ratio MED_RPS "$w")" "$(ratio MED_P99 "$w")"
    done
    if [[ $SKIP_CORDON != 1 ]]; then
        echo
        echo "cordon per request, from /health over the measured runs (instantiation; CPU of the request's task):"
        for w in "${WORKLOAD_LIST[@]}"; do
            if [[ $STATS_OK == 1 && ${STAT_N[$w]} -gt 0 ]]; then
                awk -v w="$w" -v n="${STAT_N[$w]}" -v i="${STAT_INST[$w]}" -v c="${STAT_CPU[$w]}" \
                    'BEGIN { printf "  %-11s instantiate %6.1f us, cpu %6.1f us  (%d requests)\n", w, i / n, c / n, n }'
            else
                printf '  %-11s n/a\n' "$w"
            fi
        done
    fi
}

save_report render

for w in "${WORKLOAD_LIST[@]}"; do
    for s in "${SERVERS[@]}"; do
        if [[ ${ERRS[$s.$w]} != "0/0" ]]; then
            log "warning: $w on $s had errors during measurement (non-2xx/socket: ${ERRS[$s.$w]}); its numbers are suspect"
        fi
    done
done
