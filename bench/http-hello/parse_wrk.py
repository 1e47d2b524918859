#!/usr/bin/env python3
"""Extract throughput and tail latency from `wrk --latency` output.

    parse_wrk.py FILE...            one line per file:
                                    rps p99_ms non2xx socket_errors
    parse_wrk.py --median FILE...   one line for all files:
                                    median_rps median_p99_ms total_non2xx total_socket_errors

Exits non-zero with a message on stderr if a file lacks the Requests/sec
line or the 99% line of the latency distribution.
"""

import re
import statistics
import sys

# wrk prints latencies with these suffixes (see wrk's units.c).
_UNIT_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}

_RPS = re.compile(r"^\s*Requests/sec:\s+([0-9.]+)\s*$", re.M)
_P99 = re.compile(r"^\s*99(?:\.0+)?%\s+([0-9.]+)(us|ms|s|m|h)\s*$", re.M)
_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)\s*$", re.M)
_SOCKET = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$",
    re.M,
)


class ParseError(Exception):
    pass


def parse(text, name):
    rps = _RPS.search(text)
    if not rps:
        raise ParseError(f"{name}: no 'Requests/sec' line (did wrk fail?)")
    p99 = _P99.search(text)
    if not p99:
        raise ParseError(f"{name}: no 99% latency line (was --latency passed?)")
    non2xx = _NON2XX.search(text)
    sock = _SOCKET.search(text)
    return {
        "rps": float(rps.group(1)),
        "p99_ms": float(p99.group(1)) * _UNIT_TO_MS[p99.group(2)],
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0,
    }


def fmt(rps, p99_ms, non2xx, socket_errors):
    return f"{rps:.2f} {p99_ms:.3f} {non2xx} {socket_errors}"


def main(argv):
    median = False
    if argv and argv[0] == "--median":
        median = True
        argv = argv[1:]
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2

    runs = []
    try:
        for path in argv:
            with open(path, encoding="utf-8", errors="replace") as f:
                runs.append(parse(f.read(), path))
    except (OSError, ParseError) as e:
        print(f"parse_wrk: {e}", file=sys.stderr)
        return 1

    if median:
        print(
            fmt(
                statistics.median(r["rps"] for r in runs),
                statistics.median(r["p99_ms"] for r in runs),
                sum(r["non2xx"] for r in runs),
                sum(r["socket_errors"] for r in runs),
            )
        )
    else:
        for r in runs:
            print(fmt(r["rps"], r["p99_ms"], r["non2xx"], r["socket_errors"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
