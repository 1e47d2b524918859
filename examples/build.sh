#!/usr/bin/env bash
# Builds the example workers into WebAssembly components.
#
# Usage: examples/build.sh   (works from any directory)
set -euo pipefail

examples_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(dirname "$examples_dir")"
target_dir="$repo_dir/target/guests"

rustup target list --installed | grep -q wasm32-wasip2 || rustup target add wasm32-wasip2

for example in hello fetch kv-counter notes; do
    cargo build --release --target wasm32-wasip2 \
        --manifest-path "$examples_dir/$example/Cargo.toml" \
        --target-dir "$target_dir"
    cp "$target_dir/wasm32-wasip2/release/${example//-/_}.wasm" "$examples_dir/$example/$example.wasm"
    echo "built $examples_dir/$example/$example.wasm"
done
