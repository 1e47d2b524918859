#!/usr/bin/env bash
# http-hello: serve the same hello-world from Cordon, workerd and raw hyper on
# this machine and compare throughput and tail latency with wrk.
#
# Usage: bench/http-hello/run.sh          (from any directory)
#
# Environment:
#   ROUNDS=3            measured rounds per server (medians are reported)
#   DURATION=10s        wrk duration of one measured run
#   CONNECTIONS=64      wrk -c
#   THREADS=2           wrk -t
#   WARMUP=3s           wrk duration of the discarded warm-up run per server
#   SKIP_CORDON=0       1: leave Cordon out (no cordon build, no guest build)
#   SKIP_BUILD=0        1: reuse the existing release binaries and hello.wasm
#   WORKERD_VERSION     npm version of workerd to install into bench/.cache
#   READY_TIMEOUT=60    seconds to wait for each server to come up
#   CORDON_LOG=warn     RUST_LOG for the cordon process
#   KEEP_TMP=0          1: keep the temp dir (configs, logs, raw wrk output)
#   CORDON_BIN, HELLO_WASM
#                       override the cordon binary / guest component to serve
#                       (defaults: target/release/cordon, examples/hello/hello.wasm)
#   BASELINE_BIN        a second cordon binary (an earlier build) served beside
#                       the first with the same config, in the same rounds, to
#                       give the cost of a change as cordon / baseline
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
WARMUP=${WARMUP:-3s}
SKIP_CORDON=${SKIP_CORDON:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
WORKERD_VERSION=${WORKERD_VERSION:-1.20261117.1}
READY_TIMEOUT=${READY_TIMEOUT:-60}
CORDON_LOG=${CORDON_LOG:-warn}
KEEP_TMP=${KEEP_TMP:-0}

CALLER_DIR=$PWD
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)
BENCH_DIR="$REPO_ROOT/bench"
CACHE_DIR="$BENCH_DIR/.cache"
RESULTS_DIR="$BENCH_DIR/results"
PARSE="$SCRIPT_DIR/parse_wrk.py"

# Every request carries this Host header: Cordon routes on it ("localhost/"),
# the other two ignore it, so all three see byte-identical requests.
HOST_HEADER="localhost"
EXPECTED_PREFIX="Hello from Cordon"

BENCH_NAME=http-hello
# shellcheck source=../lib.sh
source "$BENCH_DIR/lib.sh"

is_uint "$ROUNDS" || die "ROUNDS must be a positive integer (got '$ROUNDS')"
is_uint "$CONNECTIONS" || die "CONNECTIONS must be a positive integer (got '$CONNECTIONS')"
is_uint "$THREADS" || die "THREADS must be a positive integer (got '$THREADS')"
is_uint "$READY_TIMEOUT" || die "READY_TIMEOUT must be a positive integer (got '$READY_TIMEOUT')"
(( THREADS <= CONNECTIONS )) || die "THREADS ($THREADS) must not exceed CONNECTIONS ($CONNECTIONS)"

require_tools cargo curl python3 wrk

# --------------------------------------------------------------------------
# Process bookkeeping: everything started here is stopped on exit.

make_tmp_dir
track_processes

# check_hello NAME URL: one GET must return 200 with the hello body.
check_hello() {
    local name=$1 url=$2 body="$TMP_DIR/$1.check" code
    code=$(curl -sS -o "$body" -w '%{http_code}' --max-time 10 \
        -H "Host: $HOST_HEADER" "$url") || {
        show_log "$TMP_DIR/$name.log"
        die "$name: request to $url failed"
    }
    if [[ $code != 200 ]]; then
        log "$name answered HTTP $code; body:"
        head -c 2000 "$body" >&2 || true
        show_log "$TMP_DIR/$name.log"
        die "$name does not answer 200 on $url (Host: $HOST_HEADER)"
    fi
    if [[ $(head -c ${#EXPECTED_PREFIX} "$body") != "$EXPECTED_PREFIX" ]]; then
        log "warning: $name answered 200 but the body does not start with '$EXPECTED_PREFIX':"
        head -c 500 "$body" >&2 || true
    fi
    log "$name OK: 200 from $url"
}

# --------------------------------------------------------------------------
# Build and install.

cd "$REPO_ROOT"

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
CORDON_BIN=${CORDON_BIN:-"$TARGET_DIR/release/cordon"}
RAW_HYPER_BIN="$TARGET_DIR/release/raw-hyper-hello"
HELLO_WASM=${HELLO_WASM:-"$REPO_ROOT/examples/hello/hello.wasm"}
[[ $CORDON_BIN == /* ]] || CORDON_BIN="$CALLER_DIR/$CORDON_BIN"
BASELINE_BIN=${BASELINE_BIN:-}
if [[ -n $BASELINE_BIN ]]; then
    [[ $BASELINE_BIN == /* ]] || BASELINE_BIN="$CALLER_DIR/$BASELINE_BIN"
    [[ $SKIP_CORDON != 1 ]] || die "BASELINE_BIN needs Cordon (SKIP_CORDON=0)"
    [[ -x $BASELINE_BIN ]] || die "missing $BASELINE_BIN"
fi
[[ $HELLO_WASM == /* ]] || HELLO_WASM="$CALLER_DIR/$HELLO_WASM"

SERVERS=()
[[ $SKIP_CORDON == 1 ]] || SERVERS+=(cordon)
[[ -z $BASELINE_BIN ]] || SERVERS+=(baseline)
SERVERS+=(workerd raw-hyper)

if [[ $SKIP_BUILD != 1 ]]; then
    packages=(-p raw-hyper-hello)
    [[ $SKIP_CORDON == 1 ]] || packages=(-p cordon "${packages[@]}")
    log "cargo build --release ${packages[*]}"
    cargo build --release "${packages[@]}"

    if [[ $SKIP_CORDON != 1 ]]; then
        [[ -f $REPO_ROOT/examples/build.sh ]] || die "examples/build.sh not found"
        log "building guests: examples/build.sh"
        bash "$REPO_ROOT/examples/build.sh"
    fi
fi

[[ -x $RAW_HYPER_BIN ]] || die "missing $RAW_HYPER_BIN (run without SKIP_BUILD=1)"
if [[ $SKIP_CORDON != 1 ]]; then
    [[ -x $CORDON_BIN ]] || die "missing $CORDON_BIN (run without SKIP_BUILD=1)"
    [[ -f $HELLO_WASM ]] || die "missing $HELLO_WASM (examples/build.sh did not produce it)"
fi

WORKERD_PREFIX="$CACHE_DIR/workerd"

installed_workerd_version() {
    local pkg="$WORKERD_PREFIX/node_modules/workerd/package.json"
    [[ -f $pkg ]] || return 0
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$pkg" 2>/dev/null || true
}

find_workerd() {
    local candidate
    for candidate in "$WORKERD_PREFIX"/node_modules/@cloudflare/workerd-*/bin/workerd \
                     "$WORKERD_PREFIX/node_modules/.bin/workerd"; do
        if [[ -x $candidate ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ $(installed_workerd_version) != "$WORKERD_VERSION" ]] || ! find_workerd >/dev/null; then
    command -v npm >/dev/null 2>&1 || die "npm not found; it is needed once to install workerd"
    log "installing workerd@$WORKERD_VERSION into $WORKERD_PREFIX"
    mkdir -p "$WORKERD_PREFIX"
    npm install --prefix "$WORKERD_PREFIX" --no-audit --no-fund --loglevel=error \
        "workerd@$WORKERD_VERSION" >&2
fi
WORKERD_BIN=$(find_workerd) || die "workerd binary not found under $WORKERD_PREFIX/node_modules"
WORKERD_REPORTED=$("$WORKERD_BIN" --version 2>&1 | head -n 1 || true)

# --------------------------------------------------------------------------
# Start the servers.

read -r CORDON_PORT CORDON_ADMIN_PORT WORKERD_PORT RAW_HYPER_PORT BASELINE_PORT BASELINE_ADMIN_PORT < <(free_ports 6)

declare -A URLS=(
    [baseline]="http://127.0.0.1:$BASELINE_PORT/"
    [cordon]="http://127.0.0.1:$CORDON_PORT/"
    [workerd]="http://127.0.0.1:$WORKERD_PORT/"
    [raw-hyper]="http://127.0.0.1:$RAW_HYPER_PORT/"
)
HEALTH_URL="http://127.0.0.1:$CORDON_ADMIN_PORT/health"

if [[ $SKIP_CORDON != 1 ]]; then
    # Cordon refuses a data directory that others can write.
    mkdir -p -m 700 "$TMP_DIR/data"
    cat >"$TMP_DIR/cordon.toml" <<EOF
[server]
listen = "127.0.0.1:$CORDON_PORT"
admin_listen = "127.0.0.1:$CORDON_ADMIN_PORT"
data_dir = "$TMP_DIR/data"

[[worker]]
name = "hello"
tenant = "bench"
component = "$HELLO_WASM"
routes = ["localhost/"]
EOF
    start cordon "$TMP_DIR/cordon.log" \
        env RUST_LOG="$CORDON_LOG" "$CORDON_BIN" serve --config "$TMP_DIR/cordon.toml"
    if [[ -n $BASELINE_BIN ]]; then
        mkdir -p -m 700 "$TMP_DIR/baseline-data"
        sed -e "s|127.0.0.1:$CORDON_PORT|127.0.0.1:$BASELINE_PORT|" \
            -e "s|127.0.0.1:$CORDON_ADMIN_PORT|127.0.0.1:$BASELINE_ADMIN_PORT|" \
            -e "s|$TMP_DIR/data|$TMP_DIR/baseline-data|" "$TMP_DIR/cordon.toml" >"$TMP_DIR/baseline.toml"
        start baseline "$TMP_DIR/baseline.log" \
            env RUST_LOG="$CORDON_LOG" "$BASELINE_BIN" serve --config "$TMP_DIR/baseline.toml"
    fi
fi

# The capnp file embeds worker.js by a relative path, so it is used in place;
# only the socket address is overridden.
start workerd "$TMP_DIR/workerd.log" \
    "$WORKERD_BIN" serve "$SCRIPT_DIR/workerd/config.capnp" \
    --socket-addr "http=127.0.0.1:$WORKERD_PORT"

start raw-hyper "$TMP_DIR/raw-hyper.log" "$RAW_HYPER_BIN" "127.0.0.1:$RAW_HYPER_PORT"

if [[ $SKIP_CORDON != 1 ]]; then
    wait_http cordon "$HEALTH_URL" "$HOST_HEADER"
    log "cordon admin ready: $HEALTH_URL"
    [[ -z $BASELINE_BIN ]] || wait_http baseline "http://127.0.0.1:$BASELINE_ADMIN_PORT/health" "$HOST_HEADER"
fi
wait_http workerd "${URLS[workerd]}" "$HOST_HEADER"
wait_http raw-hyper "${URLS[raw-hyper]}" "$HOST_HEADER"

for s in "${SERVERS[@]}"; do
    check_hello "$s" "${URLS[$s]}"
done

# --------------------------------------------------------------------------
# Measure.

note_load

log "warm-up: $WARMUP per server"
for s in "${SERVERS[@]}"; do
    run_wrk "$TMP_DIR/$s.warmup.txt" "${URLS[$s]}" "$WARMUP"
done

# Rounds alternate between servers, and the starting server rotates each
# round, so slow drift of the machine (thermal, noisy neighbours) is spread
# over all three instead of landing on one.
n=${#SERVERS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
        s=${SERVERS[$(((i + r - 1) % n))]}
        out="$TMP_DIR/$s.round$r.txt"
        log "round $r/$ROUNDS: $s (wrk -t$THREADS -c$CONNECTIONS -d$DURATION)"
        run_wrk "$out" "${URLS[$s]}" "$DURATION"
        read -r rps p99 non2xx sockerr < <("$PARSE" "$out") \
            || die "could not parse wrk output $out"
        log "  $rps req/s, p99 $p99 ms, non-2xx $non2xx, socket errors $sockerr"
        alive "$s"
    done
done

# --------------------------------------------------------------------------
# Report.

declare -A MED_RPS MED_P99 ERRS ROUND_RPS
for s in "${SERVERS[@]}"; do
    files=()
    for ((r = 1; r <= ROUNDS; r++)); do files+=("$TMP_DIR/$s.round$r.txt"); done
    read -r rps p99 non2xx sockerr < <("$PARSE" --median "${files[@]}") \
        || die "could not summarise wrk output for $s"
    MED_RPS[$s]=$rps
    MED_P99[$s]=$p99
    ERRS[$s]="$non2xx/$sockerr"
    ROUND_RPS[$s]=$("$PARSE" "${files[@]}" | awk '{printf "%s%.0f", (NR > 1 ? " " : ""), $1}')
done

ratio() {
    local a=${MED_RPS[$1]:-} b=${MED_RPS[$2]:-}
    if [[ -z $a || -z $b ]]; then
        echo "n/a"
    else
        awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'
    fi
}

INSTANTIATE="n/a"
CORDON_REQUESTS="n/a"
if [[ $SKIP_CORDON != 1 ]]; then
    if curl -sS --max-time 5 -o "$TMP_DIR/health.json" "$HEALTH_URL"; then
        read -r INSTANTIATE CORDON_REQUESTS < <(python3 - "$TMP_DIR/health.json" <<'EOF'
import json, sys

def find_workers(node):
    if isinstance(node, dict):
        if isinstance(node.get("workers"), list):
            return node["workers"]
        for v in node.values():
            found = find_workers(v)
            if found is not None:
                return found
    elif isinstance(node, list):
        for v in node:
            found = find_workers(v)
            if found is not None:
                return found
    return None

mean, requests = "n/a", "n/a"
try:
    with open(sys.argv[1]) as f:
        workers = find_workers(json.load(f)) or []
    for w in workers:
        if isinstance(w, dict) and w.get("name") == "hello":
            stats = w.get("stats") or {}
            v = stats.get("instantiate_us_mean")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                mean = f"{v:.1f}"
            n = stats.get("requests")
            if isinstance(n, int) and not isinstance(n, bool):
                requests = str(n)
            break
except (OSError, ValueError):
    pass
print(mean, requests)
EOF
        ) || true
    else
        log "warning: could not fetch $HEALTH_URL after the run"
    fi
fi

CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo "none")
STAMP=$(date -u '+%Y-%m-%dT%H:%M:%SZ')

render() {
    echo "http-hello benchmark, $STAMP"
    echo "machine:  $(uname -sr), $(nproc) CPUs${CPU_MODEL:+, $CPU_MODEL}"
    echo "load avg: $LOAD_BEFORE (1/5/15 min, taken before the warm-up)"
    echo "git:      $GIT_REV"
    echo "load:     wrk --latency -t$THREADS -c$CONNECTIONS -d$DURATION, warm-up $WARMUP, $ROUNDS rounds (median shown)"
    echo "workerd:  $WORKERD_VERSION ($WORKERD_REPORTED)"
    echo
    printf '%-10s %14s %12s %12s  %s\n' "server" "req/s" "p99 ms" "errors" "req/s per round"
    for s in cordon baseline workerd raw-hyper; do
        [[ $s != baseline || -n $BASELINE_BIN ]] || continue
        if [[ -n ${MED_RPS[$s]:-} ]]; then
            printf '%-10s %14.0f %12.2f %12s  %s\n' \
                "$s" "${MED_RPS[$s]}" "${MED_P99[$s]}" "${ERRS[$s]}" "${ROUND_RPS[$s]}"
        else
            printf '%-10s %14s %12s %12s  %s\n' "$s" "skipped" "-" "-" "-"
        fi
    done
    echo
    echo "errors = non-2xx responses / socket errors, summed over the rounds"
    echo
    [[ -z $BASELINE_BIN ]] || echo "cordon / baseline  (req/s): $(ratio cordon baseline)  (baseline: $BASELINE_BIN)"
    echo "cordon / workerd   (req/s): $(ratio cordon workerd)"
    echo "cordon / raw-hyper (req/s): $(ratio cordon raw-hyper)"
    echo "workerd / raw-hyper (req/s): $(ratio workerd raw-hyper)"
    if [[ $INSTANTIATE == n/a ]]; then
        echo "cordon mean instantiation: n/a"
    else
        echo "cordon mean instantiation: $INSTANTIATE us (over $CORDON_REQUESTS requests incl. warm-up)"
    fi
}

save_report render

for s in "${SERVERS[@]}"; do
    if [[ ${ERRS[$s]} != "0/0" ]]; then
        log "warning: $s had errors during measurement (non-2xx/socket: ${ERRS[$s]}); its numbers are suspect"
    fi
done
