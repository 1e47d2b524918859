#!/usr/bin/env python3
"""Small parsers for bench/noisy-neighbour/run.sh.

    parse.py cpu HEALTH_JSON TENANT...
        guest CPU microseconds of each tenant (cpu.tenants.<t>.guest_cpu_us),
        one per tenant on one line; "n/a" for each if the build's /health
        has no such key (an older build, without the scheduler).
    parse.py busy HEALTH_JSON TENANT
        "busy" if the tenant still has requests in flight or queued
        (tenants.<t>.in_flight / queued), "idle" if not, "unknown" if the
        build's /health does not say.
    parse.py rate NOISY_RATE_JSON
        "sent ok errors p50_us p99_us p999_us max_us lag_p99_us" from
        noisy-rate's output line ("n/a" for a missing percentile).
"""

import json
import sys


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def cpu(path, tenants):
    h = load(path)
    out = []
    for t in tenants:
        try:
            v = h["cpu"]["tenants"][t]["guest_cpu_us"]
        except (KeyError, TypeError):
            v = None
        out.append(str(v) if is_int(v) else "n/a")
    print(" ".join(out))


def busy(path, tenant):
    h = load(path)
    try:
        t = h["tenants"][tenant]
        n = t["in_flight"] + t["queued"]
    except (KeyError, TypeError):
        print("unknown")
        return
    print("busy" if n > 0 else "idle")


def rate(path):
    # The last line that parses as JSON: noisy-rate prints exactly one.
    r = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                pass
    if not isinstance(r, dict) or "sent" not in r:
        print(f"parse.py: no noisy-rate result in {path}", file=sys.stderr)
        sys.exit(1)
    keys = ["sent", "ok", "errors", "p50_us", "p99_us", "p999_us", "max_us", "lag_p99_us"]
    print(" ".join(str(r[k]) if is_int(r.get(k)) else "n/a" for k in keys))


def main(argv):
    if len(argv) >= 3 and argv[0] == "cpu":
        cpu(argv[1], argv[2:])
    elif len(argv) == 3 and argv[0] == "busy":
        busy(argv[1], argv[2])
    elif len(argv) == 2 and argv[0] == "rate":
        rate(argv[1])
    else:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
