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

# The crates/pgaccel tests start throwaway Postgres clusters of their own
# (initdb and pg_ctl, on free ports); they need the server programs, which
# Debian keeps in /usr/lib/postgresql/<version>/bin, off PATH.
ensure_postgres() {
    if command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        return
    fi
    echo "no initdb: installing Debian's postgresql" >&2
    # No cluster of the package's own on port 5432: the tests make theirs.
    # (A drop-in, not an edit of the package's createcluster.conf.)
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' | as_root tee /etc/postgresql-common/createcluster.d/cordon-tests.conf >/dev/null
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
}
