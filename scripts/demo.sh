#!/usr/bin/env bash
# Sets everything up on a fresh Debian machine and runs Cordon with the demo
# workers of examples/cordon.toml on the embedded defaults.
#
#   ./scripts/demo.sh            then: curl -H 'Host: hello.localhost' http://127.0.0.1:8080/
#                                      curl http://127.0.0.1:8081/health
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/lib.sh
ensure_toolchain

examples/build.sh
cargo build --release -p cordon
exec target/release/cordon serve --config examples/cordon.toml "$@"
