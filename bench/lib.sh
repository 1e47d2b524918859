# shellcheck shell=bash
# Helpers shared by the benchmark scripts (bench/*/run.sh). Sourced, not run:
#
#   BENCH_NAME=http-hello
#   source "$REPO_ROOT/bench/lib.sh"
#
# BENCH_NAME prefixes every log line and names the temp dir and the result
# file. The sourcing script keeps `set -euo pipefail` and its own variables;
# the helpers below read these of them where noted: TMP_DIR, KEEP_TMP,
# READY_TIMEOUT, THREADS, CONNECTIONS, HOST_HEADER, REPO_ROOT, RESULTS_DIR.

: "${BENCH_NAME:?set BENCH_NAME before sourcing bench/lib.sh}"

log() { printf '[%s] %s\n' "$BENCH_NAME" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$BENCH_NAME" "$*" >&2; exit 1; }

is_uint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# require_tools TOOL...: die unless every TOOL is in PATH.
require_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found in PATH (Debian: apt-get install -y $tool)"
    done
}

# --------------------------------------------------------------------------
# Process bookkeeping: everything started here is stopped on exit.

# make_tmp_dir: TMP_DIR = a new directory for configs, logs and raw output.
make_tmp_dir() {
    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/$BENCH_NAME.XXXXXX")
}

# track_processes [NAME...]: start the bookkeeping of background processes
# (PIDS: name -> pid) and install the exit trap, which stops them all and
# removes TMP_DIR, or keeps it on failure or with KEEP_TMP=1. The NAMEs are
# stopped before the others. If the script defines on_cleanup, the trap
# then calls it with 1 if TMP_DIR was kept, 0 if it was removed.
track_processes() {
    declare -gA PIDS=()
    STOP_FIRST=("$@")
    trap cleanup_on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup_on_exit() {
    local rc=$? name kept=0
    trap - EXIT INT TERM
    # STOP_FIRST are the load generators, so that the servers are not
    # stopped under load.
    for name in "${STOP_FIRST[@]}" "${!PIDS[@]}"; do
        [[ -z ${PIDS[$name]:-} ]] || stop_pid "${PIDS[$name]}"
        unset "PIDS[$name]"
    done
    if [[ $KEEP_TMP == 1 || $rc != 0 ]]; then
        kept=1
        log "temp dir kept: $TMP_DIR"
    else
        rm -rf -- "$TMP_DIR"
    fi
    if declare -F on_cleanup >/dev/null; then
        on_cleanup "$kept"
    fi
    exit "$rc"
}

# N distinct free loopback ports, all held open at once while choosing.
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

show_log() {
    local file=$1
    if [[ -s $file ]]; then
        log "last lines of $file:"
        tail -n 30 "$file" >&2
    fi
}

# start NAME LOGFILE CMD...: run CMD in the background, remember its pid.
start() {
    local name=$1 logfile=$2
    shift 2
    "$@" >"$logfile" 2>&1 &
    PIDS[$name]=$!
    log "started $name (pid ${PIDS[$name]}): $*"
}

# alive NAME: die with its log if the server NAME has exited.
alive() {
    if ! kill -0 "${PIDS[$1]}" 2>/dev/null; then
        show_log "$TMP_DIR/$1.log"
        die "$1 died during the benchmark"
    fi
}

# What wait_http says when the server exits before it answers (a script may
# set its own after sourcing this file).
EXITED_BEFORE_READY="exited before becoming ready"

# wait_http NAME URL [HOST]: poll URL (with a Host: HOST header if given)
# until it answers 200, or fail after READY_TIMEOUT seconds.
wait_http() {
    local name=$1 url=$2 host=${3-}
    local deadline=$((SECONDS + READY_TIMEOUT))
    local args=(-s -o /dev/null -w '%{http_code}' --max-time 2)
    [[ -z $host ]] || args+=(-H "Host: $host")
    while (( SECONDS < deadline )); do
        if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
            show_log "$TMP_DIR/$name.log"
            die "$name $EXITED_BEFORE_READY"
        fi
        if [[ $(curl "${args[@]}" "$url" 2>/dev/null || true) == 200 ]]; then
            return 0
        fi
        sleep 0.2
    done
    show_log "$TMP_DIR/$name.log"
    die "$name did not answer 200 on $url within ${READY_TIMEOUT}s"
}

# bg_wait NAME: wait for the background job PIDS[NAME]; returns its status.
bg_wait() {
    local rc=0
    wait "${PIDS[$1]}" || rc=$?
    unset "PIDS[$1]"
    return "$rc"
}

# run_wrk OUTFILE URL DURATION [LUA-SCRIPT]: one wrk run with THREADS,
# CONNECTIONS and a Host: HOST_HEADER header; dies if wrk fails.
run_wrk() {
    local out=$1 url=$2 duration=$3 script=${4-} rc=0
    local args=(--latency -t"$THREADS" -c"$CONNECTIONS" -d"$duration" -H "Host: $HOST_HEADER")
    [[ -z $script ]] || args+=(-s "$script")
    # In the background so that a signal reaches the trap without waiting
    # for wrk to finish its run.
    wrk "${args[@]}" "$url" >"$out" 2>&1 &
    PIDS[wrk]=$!
    bg_wait wrk || rc=$?
    if (( rc != 0 )); then
        cat "$out" >&2
        die "wrk failed against $url (exit $rc)"
    fi
}

# --------------------------------------------------------------------------
# Measuring and reporting.

# note_load: LOAD_BEFORE = the load average now (1/5/15 min).
# A busy machine (a parallel cargo build, say) makes every number
# meaningless, so say so up front and in the result file.
note_load() {
    LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "n/a")
    if awk -v l="${LOAD_BEFORE%% *}" -v n="$(nproc)" 'BEGIN { exit !(l + 0 > n * 0.5) }'; then
        log "warning: load average is $LOAD_BEFORE on $(nproc) CPUs; results will be noisy"
    fi
}

# save_report RENDER: print the output of the function RENDER and write it
# to RESULTS_DIR/BENCH_NAME-<date>.txt (-<date>-<time>.txt if that exists).
save_report() {
    mkdir -p "$RESULTS_DIR"
    RESULT_FILE="$RESULTS_DIR/$BENCH_NAME-$(date '+%Y-%m-%d').txt"
    if [[ -e $RESULT_FILE ]]; then
        RESULT_FILE="$RESULTS_DIR/$BENCH_NAME-$(date '+%Y-%m-%d-%H%M%S').txt"
    fi

    echo
    "$1" | tee "$RESULT_FILE"
    echo
    log "written to ${RESULT_FILE#"$REPO_ROOT"/}"
}
