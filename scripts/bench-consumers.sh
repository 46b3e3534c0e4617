#!/usr/bin/env bash
# The gateway with many consumers: wrk through `tollgate up` (API-key auth, rate limit, metering)
# with one configured consumer (the baseline, same run) and with CONSUMERS consumers of one key
# each (the key used by the load is the last one listed). Every consumer has a rate limit and a
# monthly quota (too large to reach), so the gateway enforces both for all of them. Reports
# requests/s and p99 of each, the ratio, the process's RSS and CPU while idle afterwards, and
# how many requests a consumer with a 1,000-request quota gets through under the same load.
# Usage: CONSUMERS=100000 ROUNDS=3 [PART=gateway] scripts/bench-consumers.sh [BINARY...]
#   PART=gateway measures `tollgate gateway` on its own (a build with the `kafka` feature),
#   its events produced to a Kafka-protocol broker (tansu); with no query API beside it there
#   is no quota state to overshoot, so that column is left out.
#   With binaries given (say an older build and the current one), each is measured in turn;
#   without, the release build of this tree. Each round measures one consumer, then CONSUMERS,
#   back to back; with several rounds the last line per binary is the median of the rounds'
#   ratios (single 10 s runs on a shared machine differ by 15 % or more).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
CONSUMERS="${CONSUMERS:-100000}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-32}"
for tool in wrk nginx curl; do
  command -v "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nginx curl >/dev/null; break; }
done
. scripts/lib/services.sh
bins_or_release "$@"
WORK="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

start_nginx_upstream
PART="${PART:-up}"
[ "$PART" = gateway ] && start_tansu

# config NAME N: a configuration with N consumers, the last one holding `bench-key`.
config() {
  python3 - "$WORK/$1.yaml" "$2" "$UP" "$(port)" "$(port)" <<'PY'
import hashlib, sys
path, n, up, gw, api = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
h = lambda k: "sha256:" + hashlib.sha256(k.encode()).hexdigest()
with open(path, "w") as f:
    f.write(f"""gateway:
  listen: 127.0.0.1:{gw}
  upstreams: {{ app: {{ targets: ["http://127.0.0.1:{up}"] }} }}
  routes: [ {{ id: items, methods: [GET], path: "/v1/items/{{id}}", upstream: app }} ]
  auth: {{ api_key: {{ header: x-api-key }} }}
plans:
  open: {{ rate_limit: {{ per_second: 1000000 }}, quota: {{ requests: 1000000000000 }}, pricing: {{ currency: USD, charges: {{ default: {{ unit_price: "0.0001" }} }} }} }}
  capped: {{ quota: {{ requests: 1000 }} }}
query_api: {{ listen: 127.0.0.1:{api} }}
consumers:
""")
    for i in range(n - 1):
        f.write(f'  - {{ id: c{i}, plan: open, api_keys: ["{h(f"key-{i}")}"] }}\n')
    f.write(f'  - {{ id: capped, plan: capped, api_keys: ["{h("capped-key")}"] }}\n')
    f.write(f'  - {{ id: bench, plan: open, api_keys: ["{h("bench-key")}"] }}\n')
print(gw, api)
PY
}

wrk_run() { # url [key] [duration] -> "rps p99_ms non2xx total"
  wrk -t1 -c"$CONNS" -d"${3:-$DURATION}" --latency -H "x-api-key: ${2:-bench-key}" "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)", t, re.M); v, u = float(m.group(1)), m.group(2)
p99 = v / 1000 if u == "us" else v * 1000 if u == "s" else v
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
total = int(re.search(r"(\d+) requests in", t).group(1))
print(f"{rps:.0f} {p99:.2f} {bad.group(1) if bad else 0} {total}")'
}

# measure BIN NAME N -> "rps p99 non2xx rss_mib anon_mib idle_cpu_percent admitted_of_1000"
# (RSS counts the binary's mapped pages too; the anonymous part is the process's own memory)
measure() {
  read -r gw api < <(config "$2" "$3")
  rm -rf "$WORK/data-$2"
  if [ "$PART" = gateway ]; then
    printf 'bus: { kind: kafka, brokers: "127.0.0.1:%s", topic: many-%s, partitions: 12 }\n' "$KAFKA" "$2" >> "$WORK/$2.yaml"
  fi
  RUST_LOG=warn "$1" "$PART" --config "$WORK/$2.yaml" --data-dir "$WORK/data-$2" 2>"$WORK/$2.log" &
  local pid=$!
  [ "$PART" = up ] && wait_for "curl -sf http://127.0.0.1:$api/readyz" 120
  wait_for "[ \"\$(curl -s -o /dev/null -w '%{http_code}' -H 'x-api-key: bench-key' http://127.0.0.1:$gw/v1/items/1)\" = 200 ]" 60
  local load; load=$(wrk_run "http://127.0.0.1:$gw/v1/items/1" | cut -d' ' -f1-3)
  sleep 5 # let the last events drain before the idle window
  local t0 c0 t1 c1
  t0=$(now_ms); c0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  sleep 10
  t1=$(now_ms); c1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  local rss; rss=$(awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$pid/status")
  local anon; anon=$(awk '/RssAnon/ {printf "%.0f", $2/1024}' "/proc/$pid/status")
  local idle; idle=$(python3 -c "print(round(($c1 - $c0) / $(getconf CLK_TCK) * 100000 / ($t1 - $t0), 1))")
  # Quota overshoot: `capped` (1,000 requests a month) under the same load for 3 s.
  local admitted=-
  [ "$PART" = up ] && admitted=$(wrk_run "http://127.0.0.1:$gw/v1/items/1" capped-key 3s | awk '{print $4 - $3}')
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$load $rss $anon $idle $admitted"
}

echo
echo "## Many consumers (\`CONSUMERS=$CONSUMERS PART=$PART scripts/bench-consumers.sh\`, \`tollgate $PART\`, wrk -t1 -c$CONNS -d$DURATION)"
echo
echo "| binary | consumers | requests/s | p99 | non-2xx | RSS after (anonymous) | idle CPU (10 s) | requests/s vs 1 consumer | admitted against a quota of 1,000 |"
echo "|---|---|---|---|---|---|---|---|---|"
for bin in "${BINS[@]}"; do
  ratios=()
  for _ in $(seq 1 "${ROUNDS:-1}"); do
    read -r r1 p1 b1 m1 x1 i1 a1 < <(measure "$bin" one 1)
    read -r rn pn bn mn xn in_ an < <(measure "$bin" many "$CONSUMERS")
    ratio=$(python3 -c "print(round($rn / $r1, 3))"); ratios+=("$ratio")
    echo "| \`$bin\` | 1 | $r1 | $p1 ms | $b1 | $m1 MiB ($x1) | $i1 % | 1 | $a1 |"
    echo "| \`$bin\` | $CONSUMERS | $rn | $pn ms | $bn | $mn MiB ($xn) | $in_ % | $ratio | $an |"
  done
  if [ "${#ratios[@]}" -gt 1 ]; then
    echo "| \`$bin\` | median of ${#ratios[@]} rounds | | | | | | **$(python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "${ratios[@]}")** ($(IFS=,; echo "${ratios[*]}")) | |"
  fi
done
