#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine and runs them all.
# CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/lib.sh
ensure_toolchain
ensure_postgres

# The guest components the tests run (examples/*, tests/guests/*).
examples/build.sh
for guest in hostile bindings; do
    cargo build --quiet --release --target wasm32-wasip2 \
        --manifest-path "tests/guests/$guest/Cargo.toml" --target-dir target/guests
done

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    echo "cargo-nextest not found; running the tests with cargo test" >&2
    cargo test --workspace --no-fail-fast
fi
