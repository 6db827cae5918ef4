#!/usr/bin/env python3
"""Where a per-request cost goes, function by function, from callgrind files.

    bench/callgrind-diff.py SHORT LONG N [BASE_SHORT BASE_LONG]

SHORT and LONG are two callgrind files of the same setup (bench/instructions.sh
with KEEP=DIR keeps them): LONG served N more requests than SHORT, so
(LONG - SHORT) / N is what one request costs in each function (self cost,
start-up cancelled out). With BASE_SHORT and BASE_LONG (another setup, the same
N), the table shows the difference to that setup instead: what the first setup
adds, per function. Prints the 40 largest rows (TOP=n to change), the part in
code without a symbol (`???`: the guests' code, compiled by wasmtime at run
time, so it shows what a plugin's own code and its SDK cost, apart from the
host's), and the total.

Where a file has a sibling `.map` (`KEEP/SETUP-REQUESTS.map`: wasmtime's perf map
of that run, written with `LEGATE_WASM_PERFMAP=1`, which bench/instructions.sh
sets with KEEP), guest code is named by function (`guest: NAME`) instead.
"""

import bisect
import os
import re
import subprocess
import sys

LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?)\s*(?:\[[^\]]*\])?\s*$")


def perf_map(path):
    """The guest functions of the run `path` is from: sorted (start, end, name)."""
    spans = []
    try:
        with open(os.path.splitext(path)[0] + ".map", errors="replace") as f:
            for line in f:
                start, size, name = line.rstrip("\n").split(" ", 2)
                a = int(start, 16)
                spans.append((a, a + int(size, 16), name))
    except (OSError, ValueError):
        return []
    spans.sort()
    return spans


def guest_name(spans, starts, name):
    """`name` (`???:0xADDR`) as the guest function holding ADDR, if the map has it."""
    try:
        addr = int(name.split(":", 1)[1], 16)
    except (IndexError, ValueError):
        return name
    i = bisect.bisect_right(starts, addr) - 1
    if i >= 0 and addr < spans[i][1]:
        return "guest: " + spans[i][2]
    return name


def self_costs(path):
    """Self instructions per function of one callgrind file."""
    spans = perf_map(path)
    starts = [s[0] for s in spans]
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", "--auto=no", path],
        check=True,
        capture_output=True,
        text=True,
        errors="replace",
    ).stdout
    costs = {}
    started = False
    for line in out.splitlines():
        if "file:function" in line:
            started = True
            continue
        if not started or "=>" in line:
            continue
        m = LINE.match(line)
        if m:
            # `file:function`, the file being where inlined code came from:
            # counted by function.
            name = m.group(2).split(":", 1)[-1] if m.group(2).startswith(("/", ".")) else m.group(2)
            if spans and name.startswith("???"):
                name = guest_name(spans, starts, name)
            costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def per_request(short, long, n):
    a, b = self_costs(short), self_costs(long)
    return {k: (b.get(k, 0) - a.get(k, 0)) / n for k in set(a) | set(b)}


def main(argv):
    if len(argv) not in (4, 6):
        sys.exit(__doc__)
    n = int(argv[3])
    rows = per_request(argv[1], argv[2], n)
    if len(argv) == 6:
        base = per_request(argv[4], argv[5], n)
        rows = {k: rows.get(k, 0) - base.get(k, 0) for k in set(rows) | set(base)}
    top = int(os.environ.get("TOP", "40"))
    shown = sorted(rows.items(), key=lambda kv: -abs(kv[1]))[:top]
    for name, cost in shown:
        print(f"{cost:10.1f}  {name}")
    jit = sum(v for k, v in rows.items() if k.startswith(("???", "guest: ")))
    print(f"{jit:10.1f}  of which in guest (JIT-compiled: `???` or `guest:`) code")
    print(f"{sum(rows.values()):10.1f}  TOTAL per request")


if __name__ == "__main__":
    main(sys.argv)
