#!/usr/bin/env python3
"""Parses the raw wrk and h2load outputs that bench/run.sh saves and prints
the comparison table (best round per contender and protocol).

    report.py h2log LOG OUT.json   summarize an h2load --log-file (percentiles)
    report.py table RESULTS_DIR    print the Markdown table, write results.json

Raw files are named RESULTS_DIR/raw/{contender}-{proto}-r{round}.txt; for h2
runs a sidecar {same}.lat.json holds the latency percentiles, since h2load
itself prints only min/max/mean.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Order of rows in the table, whatever order the files come in.
CONTENDERS = ["direct", "legate", "nginx", "haproxy", "native1", "native5", "wasm1", "wasm5", "wasmhdr", "wasmall", "pwnoop"]
# Legate with a filter chain (bench/filters.sh), compared with plain `legate`.
FILTER_CONTENDERS = {
    "native1": "1 native no-op filter",
    "native5": "5 native no-op filters",
    "wasm1": "1 no-op Wasm filter",
    "wasm5": "5 no-op Wasm filters",
    "wasmhdr": "1 Wasm filter reading a header",
    "wasmall": "1 no-op Wasm filter in pwnoop's phases",
    "pwnoop": "1 no-op proxy-wasm filter",
}
PROTOCOLS = ["h1", "h2"]

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _to_us(text: str) -> float:
    """'1.23ms' -> 1230.0 (wrk prints us, ms, s, m, h)."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unparsable duration {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(text: str) -> dict:
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if not rps:
        raise ValueError("no 'Requests/sec:' line (did wrk fail?)")
    pct = {
        int(p): _to_us(v)
        for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M)
    }
    total = re.search(r"^\s+(\d+) requests in", text, re.M)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return {
        "rps": float(rps.group(1)),
        "p50_us": pct.get(50),
        "p99_us": pct.get(99),
        "requests": int(total.group(1)) if total else None,
        "errors": errors,
    }


def parse_h2load(text: str, lat: dict | None) -> dict:
    fin = re.search(r"^finished in \S+, ([0-9.]+) req/s", text, re.M)
    if not fin:
        raise ValueError("no 'finished in ... req/s' line (did h2load fail?)")
    req = re.search(
        r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        text,
        re.M,
    )
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    errors = 0
    if req:
        errors += int(req.group(4)) + int(req.group(5)) + int(req.group(6))
    if codes:
        errors += int(codes.group(3)) + int(codes.group(4))
    return {
        "rps": float(fin.group(1)),
        "p50_us": lat.get("p50_us") if lat else None,
        "p99_us": lat.get("p99_us") if lat else None,
        "requests": int(req.group(3)) if req else None,
        "errors": errors,
    }


def summarize_h2log(log: Path, out: Path) -> None:
    """Latency percentiles from h2load's per-request log (3rd column, us)."""
    lat = []
    with log.open() as f:
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3:
                lat.append(int(cols[2]))
    lat.sort()

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return float(lat[min(len(lat) - 1, int(p / 100 * len(lat)))])

    out.write_text(
        json.dumps({"count": len(lat), "p50_us": pct(50), "p99_us": pct(99)}) + "\n"
    )


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.2f}s"
    if us >= 1e3:
        return f"{us / 1e3:.2f}ms"
    return f"{us:.0f}us"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}"


def table(results_dir: Path) -> int:
    runs: dict[tuple[str, str], list[dict]] = {}
    bad = []
    for raw in sorted((results_dir / "raw").glob("*-r*.txt")):
        m = re.fullmatch(r"(\w+)-(h1|h2)-r(\d+)\.txt", raw.name)
        if not m:
            continue
        contender, proto, rnd = m.group(1), m.group(2), int(m.group(3))
        text = raw.read_text(errors="replace")
        try:
            if proto == "h1":
                r = parse_wrk(text)
            else:
                side = raw.with_suffix(".lat.json")
                lat = json.loads(side.read_text()) if side.exists() else None
                r = parse_h2load(text, lat)
        except ValueError as e:
            bad.append(f"{raw.name}: {e}")
            continue
        r["round"] = rnd
        runs.setdefault((contender, proto), []).append(r)

    order = {c: i for i, c in enumerate(CONTENDERS)}
    keys = sorted(
        runs, key=lambda k: (PROTOCOLS.index(k[1]), order.get(k[0], 99), k[0])
    )
    best = {k: max(runs[k], key=lambda r: r["rps"]) for k in keys}

    lines = [
        "| contender | protocol | req/s (best) | p50 | p99 | errors | req/s per round |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for k in keys:
        b = best[k]
        per_round = " / ".join(
            f"{r['rps']:.0f}" for r in sorted(runs[k], key=lambda r: r["round"])
        )
        errors = sum(r["errors"] for r in runs[k])
        lines.append(
            f"| {k[0]} | {'HTTP/1.1' if k[1] == 'h1' else 'h2c'} | {b['rps']:.0f} | "
            f"{fmt_us(b['p50_us'])} | {fmt_us(b['p99_us'])} | {errors} | {per_round} |"
        )

    filters = [c for c in FILTER_CONTENDERS if any(k[0] == c for k in keys)]
    if filters:
        lines += [
            "",
            "| filter chain | protocol | req/s vs legate (no filters) | req/s cost | p99 vs legate |",
            "|---|---|---:|---:|---:|",
        ]
        for proto in PROTOCOLS:
            base = best.get(("legate", proto))
            for c in filters:
                b = best.get((c, proto))
                if not base or not b:
                    continue
                cost = 100.0 * (1.0 - b["rps"] / base["rps"]) if base["rps"] else float("nan")
                lines.append(
                    f"| {FILTER_CONTENDERS[c]} | {'HTTP/1.1' if proto == 'h1' else 'h2c'} | "
                    f"{ratio(b['rps'], base['rps'])} | {cost:.1f}% | "
                    f"{ratio(b['p99_us'], base['p99_us'])} |"
                )

    lines += ["", "| protocol | legate/nginx | legate/haproxy | legate/direct |", "|---|---:|---:|---:|"]
    for proto in PROTOCOLS:
        if not any(k[1] == proto for k in keys):
            continue

        def rps(c: str) -> float | None:
            b = best.get((c, proto))
            return b["rps"] if b else None

        def p99(c: str) -> float | None:
            b = best.get((c, proto))
            return b["p99_us"] if b else None

        name = "HTTP/1.1" if proto == "h1" else "h2c"
        lines.append(
            f"| {name} req/s | {ratio(rps('legate'), rps('nginx'))} | "
            f"{ratio(rps('legate'), rps('haproxy'))} | {ratio(rps('legate'), rps('direct'))} |"
        )
        lines.append(
            f"| {name} p99 | {ratio(p99('legate'), p99('nginx'))} | "
            f"{ratio(p99('legate'), p99('haproxy'))} | {ratio(p99('legate'), p99('direct'))} |"
        )
    lines.append("")
    lines.append(
        "req/s ratios above 1 favour Legate; p99 ratios below 1 favour Legate. "
        "Best of rounds by req/s; p50/p99 are from that best round."
    )
    if any(sum(r["errors"] for r in runs[k]) for k in keys):
        lines.append("WARNING: some runs had errors; their req/s may not be comparable.")
    for b in bad:
        lines.append(f"WARNING: unparsable result {b}")

    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    (results_dir / "table.md").write_text(text)
    (results_dir / "results.json").write_text(
        json.dumps(
            [
                {"contender": k[0], "protocol": k[1], "best": best[k], "rounds": runs[k]}
                for k in keys
            ],
            indent=2,
        )
        + "\n"
    )
    return 1 if bad or not keys else 0


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "h2log":
        summarize_h2log(Path(argv[2]), Path(argv[3]))
        return 0
    if len(argv) == 3 and argv[1] == "table":
        return table(Path(argv[2]))
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
