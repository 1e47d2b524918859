# Shared set-up steps for the scripts in this directory.

# The Rust toolchain comes with the machine (rustup); the WebAssembly target
# that workers are built for may not.
ensure_toolchain() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is not installed: install Rust with rustup first (https://rustup.rs)" >&2
        exit 1
    fi
    if ! rustup target list --installed | grep -qx wasm32-wasip2; then
        rustup target add wasm32-wasip2
    fi
}
