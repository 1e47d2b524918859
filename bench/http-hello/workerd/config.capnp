# workerd configuration for bench/http-hello.
#
# run.sh overrides the socket address with
#   workerd serve config.capnp --socket-addr http=127.0.0.1:PORT
# so the port below is only the default for running it by hand.

using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "hello", worker = .helloWorker),
  ],
  sockets = [
    (name = "http", address = "127.0.0.1:8787", http = (), service = "hello"),
  ],
);

const helloWorker :Workerd.Worker = (
  modules = [
    (name = "worker.js", esModule = embed "worker.js"),
  ],
  compatibilityDate = "2026-11-01",
);
