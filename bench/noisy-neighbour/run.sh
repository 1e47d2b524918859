#!/usr/bin/env bash
# noisy-neighbour: the latency of one tenant (A, a hello-world) while another
# tenant (B, a worker that spins until its CPU limit stops it) saturates the
# CPU, on one Cordon process, measured with an open-loop load generator.
#
# Phases, each against every server (cordon, and BASELINE_BIN if set):
#   idle      A alone: noisy-rate at RATE against hello.localhost
#   alone     B alone: wrk -c ATTACK_CONNECTIONS against hog.localhost/loop
#   together  B as in "alone", and A as in "idle" started LEAD s later
#   hello     hello-world throughput: wrk -c HELLO_CONNECTIONS against A
# /health is read around the measured window of "alone" and "together" for
# each tenant's guest CPU (cpu.tenants.<tenant>.guest_cpu_us).
#
# Usage: bench/noisy-neighbour/run.sh          (from any directory)
#
# Environment:
#   RATE=200              A's requests per second (noisy-rate --rate)
#   DURATION=10s          measured length of every phase (whole s or m)
#   WARMUP=1s             A's discarded warm-up before each measured run
#   CONNECTIONS=8         noisy-rate's keep-alive connection pool for A
#   ATTACK_CONNECTIONS=64 wrk -c for B
#   HELLO_CONNECTIONS=64  wrk -c for the hello-world throughput phase
#   THREADS=2             wrk -t
#   HELLO_ROUNDS=1        runs of the hello phase per server (median shown)
#   LEAD=1                seconds B runs before A's run starts (and after it)
#   SKIP_BUILD=0          1: reuse the release binaries and the guests
#   READY_TIMEOUT=60      seconds to wait for each server to come up
#   CORDON_LOG=warn       RUST_LOG for the cordon processes
#   KEEP_TMP=0            1: keep the temp dir (configs, logs, raw output)
#   EXTRA_CONFIG          TOML appended to the generated config (starting
#                         with a table header), e.g. '[[tenant]] ...'; the
#                         baseline gets it too
#   CORDON_BIN, HELLO_WASM, HOSTILE_WASM
#                         override the binary / guest components
#   BASELINE_BIN          a second cordon binary (an earlier build) run
#                         through the same phases with the same config, to
#                         report cordon / baseline
set -euo pipefail
export LC_NUMERIC=C

RATE=${RATE:-200}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
CONNECTIONS=${CONNECTIONS:-8}
ATTACK_CONNECTIONS=${ATTACK_CONNECTIONS:-64}
HELLO_CONNECTIONS=${HELLO_CONNECTIONS:-64}
THREADS=${THREADS:-2}
HELLO_ROUNDS=${HELLO_ROUNDS:-1}
LEAD=${LEAD:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
READY_TIMEOUT=${READY_TIMEOUT:-60}
CORDON_LOG=${CORDON_LOG:-warn}
KEEP_TMP=${KEEP_TMP:-0}
EXTRA_CONFIG=${EXTRA_CONFIG:-}

CALLER_DIR=$PWD
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)
RESULTS_DIR="$REPO_ROOT/bench/results"
PARSE_WRK="$REPO_ROOT/bench/http-hello/parse_wrk.py"
PARSE="$SCRIPT_DIR/parse.py"

A_HOST="hello.localhost"
B_HOST="hog.localhost"
# B's CPU limit: every /loop request spins until it is stopped here.
B_CPU_MS=50

BENCH_NAME=noisy-neighbour
# shellcheck source=../lib.sh
source "$REPO_ROOT/bench/lib.sh"
# This script's wait_http has always reported a server that exits while
# starting like one that exits during the measurement.
EXITED_BEFORE_READY="died during the benchmark"

# to_secs VALUE: "10", "10s" or "1m" in whole seconds (as wrk takes them).
to_secs() {
    [[ $1 =~ ^([0-9]+)(s|m)?$ ]] || return 1
    local n=$((10#${BASH_REMATCH[1]}))
    [[ ${BASH_REMATCH[2]} != m ]] || n=$((n * 60))
    echo "$n"
}
DURATION_S=$(to_secs "$DURATION") || die "DURATION must be whole seconds, like 10s or 1m (got '$DURATION')"
WARMUP_S=$(to_secs "$WARMUP") || die "WARMUP must be whole seconds, like 1s or 0s (got '$WARMUP')"
(( DURATION_S > 0 )) || die "DURATION must be at least 1s"
[[ $RATE =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v r="$RATE" 'BEGIN { exit !(r > 0) }' \
    || die "RATE must be a positive number (got '$RATE')"
for v in CONNECTIONS ATTACK_CONNECTIONS HELLO_CONNECTIONS THREADS HELLO_ROUNDS LEAD READY_TIMEOUT; do
    is_uint "${!v}" || die "$v must be a positive integer (got '${!v}')"
done
(( THREADS <= ATTACK_CONNECTIONS && THREADS <= HELLO_CONNECTIONS )) \
    || die "THREADS ($THREADS) must not exceed ATTACK_CONNECTIONS or HELLO_CONNECTIONS"

require_tools cargo curl python3 wrk

# --------------------------------------------------------------------------
# Process bookkeeping: everything started here is stopped on exit.

make_tmp_dir
# Load generators first, so that the servers are not stopped under load.
track_processes wrk rate

# check NAME HOST PATH CODE: one GET must answer CODE.
check() {
    local name=$1 host=$2 path=$3 want=$4 body="$TMP_DIR/$1.check" code
    code=$(curl -sS -o "$body" -w '%{http_code}' --max-time 30 -H "Host: $host" "${URLS[$name]%/}$path") || {
        show_log "$TMP_DIR/$name.log"
        die "$name: request to $host$path failed"
    }
    if [[ $code != "$want" ]]; then
        log "$name answered HTTP $code to $host$path (expected $want); body:"
        head -c 2000 "$body" >&2 || true
        echo >&2
        show_log "$TMP_DIR/$name.log"
        die "$name does not answer $want on $host$path"
    fi
    log "$name OK: $code from $host$path"
}

# health NAME FILE: save /health to FILE (an empty file if it fails).
health() {
    curl -sS --max-time 5 -o "$2" "${ADMIN_URLS[$1]}" 2>/dev/null || {
        log "warning: could not read ${ADMIN_URLS[$1]}"
        : >"$2"
    }
}

# settle NAME: wait until B's queued and running requests have drained
# (the server keeps working on them after wrk disconnects).
settle() {
    local name=$1 deadline=$((SECONDS + 60)) state
    while (( SECONDS < deadline )); do
        health "$name" "$TMP_DIR/$name.settle.json"
        state=$(python3 "$PARSE" busy "$TMP_DIR/$name.settle.json" beta)
        case $state in
            idle) sleep 0.5; return 0 ;;
            unknown) sleep 3; return 0 ;;
        esac
        sleep 0.2
    done
    log "warning: $name still had B's requests in flight 60 s after the attack"
}

# rate_a NAME OUT: A's open-loop run against server NAME (in the background
# so that a signal reaches the trap at once).
rate_a() {
    local name=$1 out=$2
    "$NOISY_RATE_BIN" --url "${URLS[$name]}" --host "$A_HOST" --rate "$RATE" \
        --duration "${DURATION_S}s" --warmup "${WARMUP_S}s" --connections "$CONNECTIONS" \
        >"$out" 2>"$out.stderr" &
    PIDS[rate]=$!
    bg_wait rate || { cat "$out.stderr" >&2; die "noisy-rate failed against $name"; }
    [[ ! -s $out.stderr ]] || log "  noisy-rate: $(head -c 300 "$out.stderr")"
}

# attack NAME PHASE: B's wrk against server NAME; during its middle window,
# A's run (PHASE=together) or a sleep of the same length (PHASE=alone).
# /health is read at both ends of the window.
attack() {
    local name=$1 phase=$2 out="$TMP_DIR/$1.$2"
    local secs=$((LEAD + WARMUP_S + DURATION_S + LEAD)) rc=0 t0 t1
    # --timeout: a /loop request queues behind the others' 50 ms of CPU
    # each; wrk's default 2 s would count them as socket errors.
    wrk --latency -t"$THREADS" -c"$ATTACK_CONNECTIONS" -d"${secs}s" --timeout 30s \
        -H "Host: $B_HOST" "${URLS[$name]}loop" >"$out.wrk.txt" 2>&1 &
    PIDS[wrk]=$!
    sleep "$LEAD"
    health "$name" "$out.health0.json"
    t0=$EPOCHREALTIME
    if [[ $phase == together ]]; then
        rate_a "$name" "$out.rate.json"
    else
        sleep $((WARMUP_S + DURATION_S))
    fi
    t1=$EPOCHREALTIME
    health "$name" "$out.health1.json"
    kill -0 "${PIDS[wrk]}" 2>/dev/null || log "warning: B's wrk ended before the window did; shares are diluted"
    bg_wait wrk || rc=$?
    if (( rc != 0 )); then
        cat "$out.wrk.txt" >&2
        die "wrk failed against $name (exit $rc)"
    fi
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f\n", b - a }' >"$out.window"
    alive "$name"
    settle "$name"
}

# hello NAME ROUND: hello-world throughput.
hello() {
    local name=$1 out="$TMP_DIR/$1.hello.$2.txt" rc=0
    wrk --latency -t"$THREADS" -c"$HELLO_CONNECTIONS" -d"${DURATION_S}s" \
        -H "Host: $A_HOST" "${URLS[$name]}" >"$out" 2>&1 &
    PIDS[wrk]=$!
    bg_wait wrk || rc=$?
    if (( rc != 0 )); then
        cat "$out" >&2
        die "wrk failed against $name (exit $rc)"
    fi
    alive "$name"
}

# --------------------------------------------------------------------------
# Build.

cd "$REPO_ROOT"

TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
GUEST_TARGET_DIR="$REPO_ROOT/target/guests"
CORDON_BIN=${CORDON_BIN:-"$TARGET_DIR/release/cordon"}
NOISY_RATE_BIN="$TARGET_DIR/release/noisy-rate"
HELLO_WASM=${HELLO_WASM:-"$REPO_ROOT/examples/hello/hello.wasm"}
HOSTILE_WASM=${HOSTILE_WASM:-"$GUEST_TARGET_DIR/wasm32-wasip2/release/hostile.wasm"}
BASELINE_BIN=${BASELINE_BIN:-}
[[ $CORDON_BIN == /* ]] || CORDON_BIN="$CALLER_DIR/$CORDON_BIN"
[[ $HELLO_WASM == /* ]] || HELLO_WASM="$CALLER_DIR/$HELLO_WASM"
[[ $HOSTILE_WASM == /* ]] || HOSTILE_WASM="$CALLER_DIR/$HOSTILE_WASM"
if [[ -n $BASELINE_BIN ]]; then
    [[ $BASELINE_BIN == /* ]] || BASELINE_BIN="$CALLER_DIR/$BASELINE_BIN"
    [[ -x $BASELINE_BIN ]] || die "missing $BASELINE_BIN"
fi

if [[ $SKIP_BUILD != 1 ]]; then
    log "cargo build --release -p cordon -p noisy-rate"
    cargo build --release -p cordon -p noisy-rate
    rustup target list --installed | grep -q wasm32-wasip2 || rustup target add wasm32-wasip2
    # As examples/build.sh does, for the one example needed here.
    log "building guests: examples/hello, tests/guests/hostile"
    cargo build --release --target wasm32-wasip2 \
        --manifest-path "$REPO_ROOT/examples/hello/Cargo.toml" --target-dir "$GUEST_TARGET_DIR"
    cp "$GUEST_TARGET_DIR/wasm32-wasip2/release/hello.wasm" "$REPO_ROOT/examples/hello/hello.wasm"
    cargo build --release --target wasm32-wasip2 \
        --manifest-path "$REPO_ROOT/tests/guests/hostile/Cargo.toml" --target-dir "$GUEST_TARGET_DIR"
fi

[[ -x $CORDON_BIN ]] || die "missing $CORDON_BIN (run without SKIP_BUILD=1)"
[[ -x $NOISY_RATE_BIN ]] || die "missing $NOISY_RATE_BIN (run without SKIP_BUILD=1)"
[[ -f $HELLO_WASM ]] || die "missing $HELLO_WASM (run without SKIP_BUILD=1)"
[[ -f $HOSTILE_WASM ]] || die "missing $HOSTILE_WASM (run without SKIP_BUILD=1)"

# --------------------------------------------------------------------------
# Start the servers.

SERVERS=(cordon)
[[ -z $BASELINE_BIN ]] || SERVERS+=(baseline)
declare -A BINS=([cordon]="$CORDON_BIN" [baseline]="$BASELINE_BIN") URLS=() ADMIN_URLS=()

read -r -a PORTS < <(free_ports $((2 * ${#SERVERS[@]})))
i=0
for s in "${SERVERS[@]}"; do
    port=${PORTS[$i]} admin=${PORTS[$((i + 1))]}
    i=$((i + 2))
    URLS[$s]="http://127.0.0.1:$port/"
    ADMIN_URLS[$s]="http://127.0.0.1:$admin/health"
    # Cordon refuses a data directory that others can write.
    mkdir -p -m 700 "$TMP_DIR/$s-data"
    cat >"$TMP_DIR/$s.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
data_dir = "$TMP_DIR/$s-data"

# Tenant A: the victim, a hello-world.
[[worker]]
name = "hello"
tenant = "alpha"
component = "$HELLO_WASM"
routes = ["$A_HOST/"]

# Tenant B: the noisy neighbour. /loop spins until the CPU limit stops it.
[[worker]]
name = "hog"
tenant = "beta"
component = "$HOSTILE_WASM"
routes = ["$B_HOST/"]

[worker.limits]
cpu_ms = $B_CPU_MS
wall_ms = 30000

$EXTRA_CONFIG
EOF
    start "$s" "$TMP_DIR/$s.log" env RUST_LOG="$CORDON_LOG" "${BINS[$s]}" serve --config "$TMP_DIR/$s.toml"
done

for s in "${SERVERS[@]}"; do
    wait_http "$s" "${ADMIN_URLS[$s]}"
    check "$s" "$A_HOST" / 200
    check "$s" "$B_HOST" /loop 503
    grep -q cpu_limit_exceeded "$TMP_DIR/$s.check" \
        || log "warning: $s's 503 from /loop does not say cpu_limit_exceeded: $(head -c 300 "$TMP_DIR/$s.check")"
    settle "$s"
done

# --------------------------------------------------------------------------
# Measure. Within a phase the servers take turns, the first one rotating
# from phase to phase, so that drift of the machine does not favour one.

note_load

n=${#SERVERS[@]}
turn=0
ORDER=()
# next_turn: ORDER = the servers in the next phase's order.
next_turn() {
    local k
    ORDER=()
    for ((k = 0; k < n; k++)); do ORDER+=("${SERVERS[$(((k + turn) % n))]}"); done
    turn=$((turn + 1))
}

next_turn
for s in "${ORDER[@]}"; do
    log "idle: $s, A alone (noisy-rate --rate $RATE --connections $CONNECTIONS, ${WARMUP_S}s + ${DURATION_S}s)"
    rate_a "$s" "$TMP_DIR/$s.idle.rate.json"
    alive "$s"
done
next_turn
for s in "${ORDER[@]}"; do
    log "alone: $s, B alone (wrk -c$ATTACK_CONNECTIONS /loop)"
    attack "$s" alone
done
next_turn
for s in "${ORDER[@]}"; do
    log "together: $s, B (wrk -c$ATTACK_CONNECTIONS /loop) and A (noisy-rate) ${LEAD}s later"
    attack "$s" together
done
for ((r = 1; r <= HELLO_ROUNDS; r++)); do
    next_turn
    for s in "${ORDER[@]}"; do
        log "hello: $s round $r/$HELLO_ROUNDS (wrk -t$THREADS -c$HELLO_CONNECTIONS -d${DURATION_S}s)"
        hello "$s" "$r"
    done
done

# --------------------------------------------------------------------------
# Report.

# ratio A B [FORMAT]: A / B, or n/a.
ratio() {
    awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN {
        if (a == "n/a" || b == "n/a" || a == "" || b == "" || b + 0 <= 0) print "n/a"; else printf f "\n", a / b }'
}

declare -A R
for s in "${SERVERS[@]}"; do
    for p in idle together; do
        f="$TMP_DIR/$s.$p.rate.json"
        read -r sent ok errs p50 p99 p999 max lag < <(python3 "$PARSE" rate "$f") \
            || die "could not parse noisy-rate output $f"
        R[$s.$p.sent]=$sent R[$s.$p.ok]=$ok R[$s.$p.errors]=$errs R[$s.$p.p50]=$p50
        R[$s.$p.p99]=$p99 R[$s.$p.p999]=$p999 R[$s.$p.max]=$max R[$s.$p.lag]=$lag
    done
    for p in alone together; do
        read -r rps _ non2xx sockerr < <(python3 "$PARSE_WRK" "$TMP_DIR/$s.$p.wrk.txt") \
            || die "could not parse wrk output $TMP_DIR/$s.$p.wrk.txt"
        R[$s.$p.rps]=$rps R[$s.$p.non2xx]=$non2xx R[$s.$p.sockerr]=$sockerr
        read -r a0 b0 < <(python3 "$PARSE" cpu "$TMP_DIR/$s.$p.health0.json" alpha beta)
        read -r a1 b1 < <(python3 "$PARSE" cpu "$TMP_DIR/$s.$p.health1.json" alpha beta)
        window=$(cat "$TMP_DIR/$s.$p.window")
        read -r share_a share_b cores_b < <(awk -v a0="$a0" -v a1="$a1" -v b0="$b0" -v b1="$b1" -v w="$window" 'BEGIN {
            if (a0 == "n/a" || a1 == "n/a" || b0 == "n/a" || b1 == "n/a") { print "n/a n/a n/a"; exit }
            da = a1 - a0; db = b1 - b0; t = da + db
            if (t > 0) printf "%.2f%% %.2f%% ", 100 * da / t, 100 * db / t; else printf "n/a n/a "
            printf "%.2f\n", db / 1e6 / w }')
        R[$s.$p.share_a]=$share_a R[$s.$p.share_b]=$share_b R[$s.$p.cores_b]=$cores_b
    done
    files=()
    for ((r = 1; r <= HELLO_ROUNDS; r++)); do files+=("$TMP_DIR/$s.hello.$r.txt"); done
    read -r rps p99 non2xx sockerr < <(python3 "$PARSE_WRK" --median "${files[@]}") \
        || die "could not parse wrk output for $s's hello phase"
    R[$s.hello.rps]=$rps R[$s.hello.p99]=$p99 R[$s.hello.errors]="$non2xx/$sockerr"
    R[$s.hello.rounds]=$(python3 "$PARSE_WRK" "${files[@]}" | awk '{printf "%s%.0f", (NR > 1 ? " " : ""), $1}')
done

CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo "none")
STAMP=$(date -u '+%Y-%m-%dT%H:%M:%SZ')

render_server() {
    local s=$1
    echo "== $s (${BINS[$s]})"
    printf '  %-22s %9s %9s %9s %9s %9s %9s\n' "A latency, us" "p50" "p99" "p99.9" "max" "ok/sent" "wait p99"
    for p in idle together; do
        local label="idle"
        [[ $p == idle ]] || label="under attack"
        printf '  %-22s %9s %9s %9s %9s %9s %9s\n' "$label" "${R[$s.$p.p50]}" "${R[$s.$p.p99]}" \
            "${R[$s.$p.p999]}" "${R[$s.$p.max]}" "${R[$s.$p.ok]}/${R[$s.$p.sent]}" "${R[$s.$p.lag]}"
    done
    printf '  %-22s %9s %9s %9s %9s\n' "attack / idle" \
        "$(ratio "${R[$s.together.p50]}" "${R[$s.idle.p50]}")" "$(ratio "${R[$s.together.p99]}" "${R[$s.idle.p99]}")" \
        "$(ratio "${R[$s.together.p999]}" "${R[$s.idle.p999]}")" "$(ratio "${R[$s.together.max]}" "${R[$s.idle.max]}")"
    echo "  (targets: p50 attack/idle <= 1.50, p99 attack/idle <= 1.20)"
    printf '  %-22s alone %.1f, under contention %.1f  (socket errors %s / %s)\n' "B /loop req/s" \
        "${R[$s.alone.rps]}" "${R[$s.together.rps]}" "${R[$s.alone.sockerr]}" "${R[$s.together.sockerr]}"
    printf '  %-22s alone %s, under contention %s\n' "B guest CPU, cores" "${R[$s.alone.cores_b]}" "${R[$s.together.cores_b]}"
    printf '  %-22s A %s, B %s\n' "guest CPU share (c)" "${R[$s.together.share_a]}" "${R[$s.together.share_b]}"
    printf '  %-22s %.0f req/s, p99 %.2f ms, errors %s  (per round: %s)\n' "hello-world" \
        "${R[$s.hello.rps]}" "${R[$s.hello.p99]}" "${R[$s.hello.errors]}" "${R[$s.hello.rounds]}"
}

render() {
    echo "noisy-neighbour benchmark, $STAMP"
    echo "machine:  $(uname -sr), $(nproc) CPUs${CPU_MODEL:+, $CPU_MODEL}"
    echo "load avg: $LOAD_BEFORE (1/5/15 min, taken before the first phase)"
    echo "git:      $GIT_REV"
    echo "A:        tenant alpha, hello.wasm on $A_HOST: noisy-rate --rate $RATE --connections $CONNECTIONS," \
         "warm-up ${WARMUP_S}s + ${DURATION_S}s (open loop, latency from the due time)"
    echo "B:        tenant beta, hostile.wasm /loop on $B_HOST, cpu_ms = $B_CPU_MS: wrk -t$THREADS -c$ATTACK_CONNECTIONS," \
         "${LEAD}s before to ${LEAD}s after A's run"
    echo "hello:    wrk -t$THREADS -c$HELLO_CONNECTIONS -d${DURATION_S}s on $A_HOST, $HELLO_ROUNDS round(s) (median shown)"
    [[ -z $EXTRA_CONFIG ]] || echo "config:   EXTRA_CONFIG = $(tr '\n' ' ' <<<"$EXTRA_CONFIG")"
    echo
    for s in "${SERVERS[@]}"; do
        render_server "$s"
        echo
    done
    if [[ -n $BASELINE_BIN ]]; then
        echo "cordon / baseline"
        printf '  %-28s %s  (target >= 0.97)\n' "hello-world req/s" "$(ratio "${R[cordon.hello.rps]}" "${R[baseline.hello.rps]}" '%.3f')"
        printf '  %-28s %s\n' "A p50 under attack" "$(ratio "${R[cordon.together.p50]}" "${R[baseline.together.p50]}")"
        printf '  %-28s %s\n' "A p99 under attack" "$(ratio "${R[cordon.together.p99]}" "${R[baseline.together.p99]}")"
        echo
    fi
    echo "wait p99: how late A's requests got a connection (in the latency too);"
    echo "B's requests all end as 503 cpu_limit_exceeded, so its req/s is its rate of 50 ms CPU slices."
}

save_report render

for s in "${SERVERS[@]}"; do
    for p in idle together; do
        [[ ${R[$s.$p.errors]} == 0 ]] || log "warning: $s: A had ${R[$s.$p.errors]} errors ($p); see the first one above"
    done
    [[ ${R[$s.hello.errors]} == 0/0 ]] || log "warning: $s: hello-world had errors (non-2xx/socket: ${R[$s.hello.errors]})"
done
