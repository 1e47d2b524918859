# Shared set-up steps for the scripts in this directory.

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The Rust toolchain comes with the machine (rustup); the WebAssembly target
# that workers are built for may not, nor the C compiler that SQLite (bundled
# by rusqlite) and ring are built with.
ensure_toolchain() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is not installed: install Rust with rustup first (https://rustup.rs)" >&2
        exit 1
    fi
    if ! rustup target list --installed | grep -qx wasm32-wasip2; then
        rustup target add wasm32-wasip2
    fi
    if ! command -v cc >/dev/null 2>&1; then
        echo "no C compiler: installing Debian's build-essential" >&2
        as_root apt-get update
        as_root apt-get install -y build-essential
    fi
}
