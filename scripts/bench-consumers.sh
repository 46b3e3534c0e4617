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
#   without, the release build of this tree. Both processes (one consumer, CONSUMERS) run side
#   by side, idle but for the load; each round loads one and then the other, the order
#   alternating from round to round (so drift over the run falls on both alike), and the
#   ratio is the median of the rounds' ratios (single 10 s runs on a shared machine differ by
#   15 % or more). Memory, idle CPU and the quota burst are measured once per process, after
#   the rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
CONSUMERS="${CONSUMERS:-100000}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-32}"
. scripts/lib/services.sh
load_tools
bins_or_release "$@"
WORK="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

start_nginx_upstream
PART="${PART:-up}"
[ "$PART" = gateway ] && start_tansu

# config NAME N: a configuration with N consumers, the last one holding `bench-key`, on ports of
# its own (the gateway's admin listener too: two `tollgate gateway`s run side by side).
config() {
  python3 - "$WORK/$1.yaml" "$2" "$UP" "$(port)" "$(port)" "$(port)" <<'PY'
import hashlib, sys
path, n, up, gw, api, admin = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
h = lambda k: "sha256:" + hashlib.sha256(k.encode()).hexdigest()
with open(path, "w") as f:
    f.write(f"""gateway:
  listen: 127.0.0.1:{gw}
  admin_listen: 127.0.0.1:{admin}
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

# launch BIN NAME N: the process with N consumers, started (a job of this shell, so that it
# can be waited for) and serving; sets L_PID, L_GW and L_API.
launch() {
  local gw api
  read -r gw api < <(config "$2" "$3")
  rm -rf "$WORK/data-$2"
  if [ "$PART" = gateway ]; then
    printf 'bus: { kind: kafka, brokers: "127.0.0.1:%s", topic: many-%s, partitions: 12 }\n' "$KAFKA" "$2" >> "$WORK/$2.yaml"
  fi
  RUST_LOG=warn "$1" "$PART" --config "$WORK/$2.yaml" --data-dir "$WORK/data-$2" 2>"$WORK/$2.log" &
  L_PID=$! L_GW=$gw L_API=$api
  [ "$PART" = up ] && wait_for "curl -sf http://127.0.0.1:$api/readyz" 120
  wait_for "[ \"\$(curl -s -o /dev/null -w '%{http_code}' -H 'x-api-key: bench-key' http://127.0.0.1:$gw/v1/items/1)\" = 200 ]" 60
}

# settle API: the last run's events stored (`tollgate up`), or a few seconds for the producer
# to deliver them (`tollgate gateway`, which has no query API to ask).
settle() {
  if [ "$PART" = up ]; then wait_stored "$1"; else sleep 5; fi
}

# after PID GW API: sets A ("rss_mib anon_mib idle_cpu_percent admitted_of_1000"), then stops
# the process and waits for it (RSS counts the binary's mapped pages too; the anonymous part is
# the process's own memory)
after() {
  settle "$3"
  # What a load leaves to do (the last flush, the allocator's trim) is done within a few
  # seconds (BENCHMARKS.md, "Many consumers"); idle is what follows.
  sleep 5
  local t0 c0 t1 c1
  t0=$(now_ms); c0=$(awk '{print $14 + $15}' "/proc/$1/stat")
  sleep 10
  t1=$(now_ms); c1=$(awk '{print $14 + $15}' "/proc/$1/stat")
  local rss; rss=$(awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status")
  local anon; anon=$(awk '/RssAnon/ {printf "%.0f", $2/1024}' "/proc/$1/status")
  local idle; idle=$(python3 -c "print(round(($c1 - $c0) / $(getconf CLK_TCK) * 100000 / ($t1 - $t0), 1))")
  # Quota overshoot: `capped` (1,000 requests a month) under the same load for 3 s.
  local admitted=-
  [ "$PART" = up ] && admitted=$(wrk_run "http://127.0.0.1:$2/v1/items/1" capped-key 3s | awk '{print $4 - $3}')
  kill "$1"; wait "$1" 2>/dev/null || true
  A="$rss $anon $idle $admitted"
}

median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }

echo
echo "## Many consumers (\`CONSUMERS=$CONSUMERS PART=$PART scripts/bench-consumers.sh\`, \`tollgate $PART\`, wrk -t1 -c$CONNS -d$DURATION)"
echo
echo "| binary | round | 1 consumer: requests/s, p99 | $CONSUMERS: requests/s, p99 | non-2xx | ratio |"
echo "|---|---|---|---|---|---|"
for bin in "${BINS[@]}"; do
  launch "$bin" one 1; pid1=$L_PID gw1=$L_GW api1=$L_API
  launch "$bin" many "$CONSUMERS"; pidn=$L_PID gwn=$L_GW apin=$L_API
  # Warm-up: connections, caches and the first flushes of each.
  wrk_run "http://127.0.0.1:$gw1/v1/items/1" bench-key 2s >/dev/null; settle "$api1"
  wrk_run "http://127.0.0.1:$gwn/v1/items/1" bench-key 2s >/dev/null; settle "$apin"
  ratios=()
  for round in $(seq 1 "${ROUNDS:-1}"); do
    if [ $((round % 2)) = 1 ]; then
      read -r r1 p1 b1 _ < <(wrk_run "http://127.0.0.1:$gw1/v1/items/1"); settle "$api1"
      read -r rn pn bn _ < <(wrk_run "http://127.0.0.1:$gwn/v1/items/1"); settle "$apin"
    else
      read -r rn pn bn _ < <(wrk_run "http://127.0.0.1:$gwn/v1/items/1"); settle "$apin"
      read -r r1 p1 b1 _ < <(wrk_run "http://127.0.0.1:$gw1/v1/items/1"); settle "$api1"
    fi
    ratio=$(python3 -c "print(round($rn / $r1, 3))"); ratios+=("$ratio")
    echo "| \`$bin\` | $round ($([ $((round % 2)) = 1 ] && echo "1 first" || echo "$CONSUMERS first")) | $r1, $p1 ms | $rn, $pn ms | $((b1 + bn)) | $ratio |"
  done
  if [ "${#ratios[@]}" -gt 1 ]; then
    echo "| \`$bin\` | median of ${#ratios[@]} rounds | | | | **$(median "${ratios[@]}")** ($(IFS=,; echo "${ratios[*]}")) |"
  fi
  after "$pid1" "$gw1" "$api1"; read -r m1 x1 i1 a1 <<<"$A"
  after "$pidn" "$gwn" "$apin"; read -r mn xn in_ an <<<"$A"
  echo
  echo "| \`$bin\` | consumers | RSS after the rounds (anonymous) | idle CPU (10 s) | admitted against a quota of 1,000 |"
  echo "|---|---|---|---|---|"
  echo "| | 1 | $m1 MiB ($x1) | $i1 % | $a1 |"
  echo "| | $CONSUMERS | $mn MiB ($xn) | $in_ % | $an |"
  echo
done
