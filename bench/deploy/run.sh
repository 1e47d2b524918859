#!/usr/bin/env bash
# deploy: how soon a new version serves after a change to the live registry.
# One cordon process serves worker `app`; each round swaps its component in
# cordon.toml (hello <-> hostile, so the two versions answer differently),
# runs `cordon reload`, and measures, on a keep-alive connection opened
# before the round:
#   reload   the wall time of `cordon reload` (re-read, check, compile or
#            load from the code cache, write the registry, swap the snapshot)
#   first    from `cordon reload` returning to the first response of the new
#            version (a request in flight may still finish on the old one)
# and prints p50 and p99 of each over ROUNDS rounds.
#
# Usage: bench/deploy/run.sh          (from any directory)
#
# Environment:
#   ROUNDS=40            reloads measured (the first compiles the other
#                        component; the rest load it from the code cache)
#   SKIP_BUILD=0         1: reuse target/release/cordon and the guests
#   READY_TIMEOUT=60     seconds to wait for the server to come up
#   KEEP_TMP=0           1: keep the temp dir (config, log)
set -euo pipefail

ROUNDS=${ROUNDS:-40}
SKIP_BUILD=${SKIP_BUILD:-0}
READY_TIMEOUT=${READY_TIMEOUT:-60}
KEEP_TMP=${KEEP_TMP:-0}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)
BENCH_NAME=deploy
# shellcheck source=../lib.sh
source "$REPO_ROOT/bench/lib.sh"
is_uint "$ROUNDS" || die "ROUNDS must be a positive integer (got '$ROUNDS')"
require_tools cargo curl python3

TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
CORDON_BIN="$TARGET_DIR/release/cordon"
HELLO_WASM="$REPO_ROOT/examples/hello/hello.wasm"
HOSTILE_WASM="$TARGET_DIR/guests/wasm32-wasip2/release/hostile.wasm"
if [[ $SKIP_BUILD != 1 ]]; then
    log "cargo build --release -p cordon, and the guests"
    (cd "$REPO_ROOT" && cargo build --release -p cordon)
    rustup target list --installed | grep -q wasm32-wasip2 || rustup target add wasm32-wasip2
    cargo build --release --target wasm32-wasip2 --manifest-path "$REPO_ROOT/examples/hello/Cargo.toml" --target-dir "$TARGET_DIR/guests"
    cp "$TARGET_DIR/guests/wasm32-wasip2/release/hello.wasm" "$HELLO_WASM"
    cargo build --release --target wasm32-wasip2 --manifest-path "$REPO_ROOT/tests/guests/hostile/Cargo.toml" --target-dir "$TARGET_DIR/guests"
fi
for f in "$CORDON_BIN" "$HELLO_WASM" "$HOSTILE_WASM"; do [[ -f $f ]] || die "missing $f (run without SKIP_BUILD=1)"; done

make_tmp_dir
track_processes
read -r PORT ADMIN_PORT < <(free_ports 2)
CONFIG="$TMP_DIR/cordon.toml"
write_config() {
    cat >"$CONFIG" <<TOML
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
data_dir = "$TMP_DIR/data"

[[worker]]
name = "app"
tenant = "bench"
component = "$1"
routes = ["app.localhost/"]
TOML
}
write_config "$HELLO_WASM"
start cordon "$TMP_DIR/cordon.log" env RUST_LOG=warn "$CORDON_BIN" serve --config "$CONFIG"
wait_http cordon "http://127.0.0.1:$PORT/" app.localhost

python3 - "$CORDON_BIN" "$CONFIG" "$PORT" "$ROUNDS" "$HELLO_WASM" "$HOSTILE_WASM" <<'PY'
import http.client, subprocess, sys, time
cordon, config, port, rounds, hello, hostile = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
text = open(config).read()
conn = http.client.HTTPConnection("127.0.0.1", port)

def body():
    global conn
    try:
        conn.request("GET", "/", headers={"Host": "app.localhost"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            sys.exit(f"a request failed during the benchmark: {r.status} {data[:200]!r}")
        return data
    except (http.client.HTTPException, OSError):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        return None

reloads, firsts = [], []
current = hello
for i in range(rounds):
    new = hostile if current == hello else hello
    open(config, "w").write(text.replace(hello, new))
    started = time.perf_counter()
    out = subprocess.run([cordon, "reload", "--config", config], capture_output=True, text=True)
    returned = time.perf_counter()
    if out.returncode != 0:
        sys.exit(f"cordon reload failed: {out.stdout}{out.stderr}")
    want = b"ok from hostile" if new == hostile else b"Hello from Cordon"
    while not (body() or b"").startswith(want):
        if time.perf_counter() - returned > 10:
            sys.exit("the new version never answered")
    firsts.append(time.perf_counter() - returned)
    reloads.append(returned - started)
    current = new

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

ms = lambda s: f"{s * 1000:.2f} ms"
print(f"rounds: {rounds} (the first compiles the other component; the rest load it from the code cache)")
print(f"cordon reload (wall)           p50 {ms(pct(reloads, 50))}  p99 {ms(pct(reloads, 99))}")
print(f"reload returned -> new version p50 {ms(pct(firsts, 50))}  p99 {ms(pct(firsts, 99))}")
PY
alive cordon
