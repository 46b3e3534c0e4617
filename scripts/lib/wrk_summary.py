"""Summarises one `wrk --latency` output: prints "requests/s p50_ms p99_ms requests non2xx".

Usage: python3 scripts/lib/wrk_summary.py WRK_OUTPUT_FILE (or - for stdin)
"""
import re
import sys


def ms(value, unit):
    v = float(value)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def summary(text):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    lat = {p: ms(*re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)" % p, text, re.M).groups()) for p in ("50", "99")}
    total = int(re.search(r"(\d+) requests in", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return f"{rps:.0f} {lat['50']:.3f} {lat['99']:.3f} {total} {non2xx.group(1) if non2xx else 0}"


if __name__ == "__main__":
    path = sys.argv[1]
    print(summary(sys.stdin.read() if path == "-" else open(path).read()))
