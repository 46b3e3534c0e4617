# Shared by the benchmark scripts (sourced, not run): free ports, polling with a deadline, timing,
# and a private ClickHouse server and Kafka-protocol broker (tansu) on loopback ports under $WORK.
# The services need WORK set; scripts/install-test-services.sh installs both.

TANSU="${TOLLGATE_TANSU:-$HOME/.cache/tollgate-tools/tansu}"

# LAYOUT=split (the benchmarks that say they honour it): the load generator and the upstream run
# on core 0 only, the proxy under test (nginx's proxy, `tollgate up`) on core 1 only, as a load
# generator on a machine of its own would leave the proxy's core to it. Each proxy then sizes
# itself to the one core it has (nginx: a worker per core it may use; Tollgate: its affinity
# mask). LAYOUT=shared (the default): every process on both cores, where the kernel places it.
# ON_LOAD and ON_PROXY are the command prefixes that do it (empty when shared).
case "${LAYOUT:-shared}" in
  shared) ON_LOAD=(); ON_PROXY=() ;;
  split)
    [ "$(nproc --all)" -ge 2 ] || { echo "LAYOUT=split needs two cores" >&2; exit 2; }
    ON_LOAD=(taskset -c 0); ON_PROXY=(taskset -c 1) ;;
  *) echo "LAYOUT is shared or split, not $LAYOUT" >&2; exit 2 ;;
esac

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_for CONDITION SECONDS: polls a shell condition every 0.1 s until it holds or time is up.
wait_for() { local deadline=$((SECONDS + $2)); until eval "$1" >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || { echo "timed out: $1" >&2; exit 1; }; sleep 0.1; done; }
now_ms() { date +%s%3N; }
# median_ms COMMAND...: the median wall time of 7 runs of a command, in ms.
median_ms() { python3 - "$@" <<'PY'
import subprocess, sys, time
ts = []
for _ in range(7):
    s = time.monotonic(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); ts.append((time.monotonic() - s) * 1000)
print(f"{sorted(ts)[3]:.1f}")
PY
}

# Starts ClickHouse in $WORK/ch; sets CH_HTTP, CH_TCP and CH_PID.
start_clickhouse() {
  CH_HTTP=$(port); CH_TCP=$(port)
  mkdir -p "$WORK/ch/"{data,tmp,user_files,log}
  cp /etc/clickhouse-server/users.xml "$WORK/ch/"
  cat > "$WORK/ch/config.xml" <<XML
<yandex><logger><level>warning</level><log>$WORK/ch/log/server.log</log><errorlog>$WORK/ch/log/error.log</errorlog></logger>
<http_port>$CH_HTTP</http_port><tcp_port>$CH_TCP</tcp_port><listen_host>127.0.0.1</listen_host>
<path>$WORK/ch/data/</path><tmp_path>$WORK/ch/tmp/</tmp_path><user_files_path>$WORK/ch/user_files/</user_files_path>
<users_config>$WORK/ch/users.xml</users_config><default_profile>default</default_profile><default_database>default</default_database>
<mark_cache_size>5368709120</mark_cache_size></yandex>
XML
  clickhouse-server --config-file="$WORK/ch/config.xml" >/dev/null 2>&1 &
  CH_PID=$!
  wait_for "curl -sf http://127.0.0.1:$CH_HTTP/ping" 60
}

# Runs one SQL statement against the ClickHouse started above.
chq() { curl -sf "http://127.0.0.1:$CH_HTTP/" --data-binary "$1"; }

# Starts tansu (memory storage) in the background; sets KAFKA (its port) and TANSU_PID.
start_tansu() {
  KAFKA=$(port)
  "${ON_LOAD[@]}" "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA" --advertised-listener-url "tcp://127.0.0.1:$KAFKA" \
    --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
  TANSU_PID=$!
  wait_for "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", $KAFKA), 1)'" 30
}

# nginx_instance NAME WORKERS HTTP-BLOCK [PREFIX...]: an nginx of its own (pid file, logs) under
# $WORK/NAME, started through PREFIX (ON_LOAD, say); the caller's cleanup stops it with
# stop_nginx_instances NAME...
nginx_instance() {
  mkdir -p "$WORK/$1/logs"
  cat > "$WORK/$1/nginx.conf" <<NGINX
worker_processes $2;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
$3
}
NGINX
  "${@:4}" nginx -p "$WORK/$1" -c "$WORK/$1/nginx.conf"
}

stop_nginx_instances() {
  for c in "$@"; do nginx -p "$WORK/$c" -c "$WORK/$c/nginx.conf" -s stop 2>/dev/null || true; done
}
# end_run INSTANCE...: what a benchmark's exit trap does: stops this shell's jobs and the nginx
# instances named, waits for them, and removes $WORK.
end_run() {
  kill $(jobs -p) 2>/dev/null || true
  stop_nginx_instances "$@"
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

# nginx_upstream_and_proxy BODY: the gateway benchmarks' baseline pair, started and answering.
# `up` (one worker; UP_WORKERS=auto for one per core) answers every path with BODY bytes on
# $UP; `px` is nginx as a plain reverse proxy in front of it on $PX (a worker per core, a
# keep-alive pool of upstream connections). How many workers the upstream has moves every
# proxy's figures on two shared cores (BENCHMARKS.md, "The gateway without its events").
# Sets UP and PX; the caller's cleanup runs `stop_nginx_instances up px`.
nginx_upstream_and_proxy() {
  UP=$(port); PX=$(port)
  nginx_instance up "${UP_WORKERS:-1}" "  server { listen 127.0.0.1:$UP; location / { return 200 '$(printf 'x%.0s' $(seq "$1"))'; } }" "${ON_LOAD[@]}"
  nginx_proxy px "$PX"
}

# nginx_proxy NAME PORT [DIRECTIVES]: instance NAME, nginx as a plain reverse proxy in front of
# $UP on PORT (a worker per core, a keep-alive pool of upstream connections), with DIRECTIVES
# added to its server block, answering. The caller's cleanup stops NAME. Started through
# ON_PROXY, with a worker per core it may use: what `auto` means, though nginx 1.22's `auto`
# counts the machine's cores, not the process's.
nginx_proxy() {
  nginx_instance "$1" "$("${ON_PROXY[@]}" nproc)" "  upstream app { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$2; ${3:-}
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }" "${ON_PROXY[@]}"
  wait_for "curl -sf http://127.0.0.1:$2/v1/items/1" 10
}

# nginx_logged_proxy: instance `pxl`, the same plain proxy as nginx_proxy's with its access log
# on as nginx ships it (`combined`, one write per request, to $WORK/pxl/logs/access.log), on a
# new port; sets PXL. The caller's cleanup stops `pxl`.
nginx_logged_proxy() {
  PXL=$(port)
  nginx_proxy pxl "$PXL" "access_log $WORK/pxl/logs/access.log;"
}

# Starts nginx as a trivial upstream answering {"ok":true} on port $UP (a free one when UP is
# unset; sets UP); $1, if given, is more of the http block (a proxy in front of it, say). The
# caller's cleanup stops it: nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop.
start_nginx_upstream() {
  UP=${UP:-$(port)}
  mkdir -p "$WORK/logs"
  cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$UP; location / { return 200 '{"ok":true}'; } }
${1:-}
}
NGINX
  nginx -p "$WORK" -c "$WORK/nginx.conf"
}

# bins_or_release BINARY...: sets BINS to the binaries given, or else to this tree's release
# build (built now).
bins_or_release() {
  BINS=("$@")
  if [ ${#BINS[@]} -eq 0 ]; then
    cargo build --release --locked >&2
    BINS=("$CARGO_TARGET_DIR/release/tollgate")
  fi
}

# load_tools [COMMAND=PACKAGE...]: wrk, nginx and curl, and each COMMAND given, the missing ones
# installed with apt-get (from PACKAGE).
load_tools() {
  local need=() t
  for t in wrk=wrk nginx=nginx curl=curl "$@"; do
    command -v "${t%%=*}" >/dev/null || need+=("${t#*=}")
  done
  [ ${#need[@]} -eq 0 ] || { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }
}

# open_loop_tools [COMMAND=PACKAGE...]: load_tools (with the same arguments), and the open-loop
# load generator (examples/open_loop.rs, built now); sets OPEN_LOOP.
open_loop_tools() {
  load_tools "$@"
  cargo build --release --locked --example open_loop >&2
  OPEN_LOOP="$CARGO_TARGET_DIR/release/examples/open_loop"
}

# bench_config FILE GATEWAY_PORT API_PORT [ADMIN_PORT]: the configuration the gateway benchmarks
# load `tollgate up` (or `tollgate gateway`, which also needs ADMIN_PORT) with: one route to the
# upstream on $UP, API-key auth (key `bench-key`), a rate limit and a monthly quota too large to
# reach (so both are checked on every request), a price.
bench_config() {
  # With JWT_PUB set (a PEM public key file), bearer tokens of issuer and audience `bench`
  # signed by its private key (kid `bench`) authenticate too.
  local jwt=""
  if [ -n "${JWT_PUB:-}" ]; then
    jwt=", jwt: { issuer: bench, audience: bench, keys: [ { kid: bench, alg: RS256, pem: \"$(awk '{printf "%s\\n", $0}' "$JWT_PUB")\" } ] }"
  fi
  cat > "$1" <<YAML
gateway:
  listen: 127.0.0.1:$2
  admin_listen: 127.0.0.1:${4:-$(port)}
  upstreams: { app: { targets: ["http://127.0.0.1:$UP"] } }
  routes: [ { id: items, methods: [GET], path: "/v1/items/{id}", upstream: app } ]
  auth: { api_key: { header: x-api-key }$jwt }
consumers: [ { id: bench, plan: open, api_keys: ["sha256:$(printf bench-key | sha256sum | cut -d' ' -f1)"] } ]
plans: { open: { rate_limit: { per_second: 10000000 }, quota: { requests: 1000000000000 },
                 pricing: { currency: USD, charges: { default: { unit_price: "0.0001" } } } } }
query_api: { listen: 127.0.0.1:$3 }
YAML
}

# launch_up BINARY CONFIG DATA_DIR LOG: starts `tollgate up` in the background; sets TG (its pid).
# By default it runs in the script's session, as a process started from a shell does, and so in
# the load generator's autogroup (Linux schedules each session's processes as one group). With
# TG_SESSION=own it runs in a session of its own (setsid), as nginx puts itself when it
# daemonizes and as a service manager starts it: a group apart from the load generator's. The
# two place wake-ups differently (BENCHMARKS.md, "Scheduling groups").
launch_up() {
  local session=()
  [ "${TG_SESSION:-}" = own ] && session=(setsid)
  # A background job of a script without job control is no process group leader, so setsid
  # makes the session in place (no fork): $! stays tollgate's pid.
  RUST_LOG=warn "${session[@]}" "${ON_PROXY[@]}" "$1" up --config "$2" --data-dir "$3" 2>"$4" &
  TG=$!
}

# launch_gateway BINARY CONFIG DATA_DIR LOG: `tollgate gateway` in the background with CONFIG
# (bench_config's) and its events produced to the broker start_tansu started (a Kafka bus
# section appended to CONFIG); sets TG (its pid).
launch_gateway() {
  echo "bus: { kind: kafka, brokers: \"127.0.0.1:$KAFKA\", topic: bench, partitions: 12 }" >> "$2"
  RUST_LOG=error "${ON_PROXY[@]}" "$1" gateway --config "$2" --data-dir "$3" 2>"$4" &
  TG=$!
}

# start_up BINARY: a fresh `tollgate up` (launch_up) with the benchmark configuration
# (bench_config) on new ports and an empty $WORK/data, answering; sets TG (its pid), GW and API
# (its ports).
start_up() {
  GW=$(port); API=$(port)
  bench_config "$WORK/tg.yaml" "$GW" "$API"
  rm -rf "$WORK/data"
  launch_up "$1" "$WORK/tg.yaml" "$WORK/data" "$WORK/tg.log"
  wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$GW/v1/items/1" 30
}

# start_gateway BINARY: a fresh `tollgate gateway` (launch_gateway, events to the broker
# start_tansu started) with the benchmark configuration on new ports and an empty
# $WORK/data-gw, answering; sets TG (its pid) and GW (its port). stop_up stops it.
start_gateway() {
  GW=$(port)
  bench_config "$WORK/gw.yaml" "$GW" "$(port)"
  rm -rf "$WORK/data-gw"
  launch_gateway "$1" "$WORK/gw.yaml" "$WORK/data-gw" "$WORK/gw.log"
  wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$GW/v1/items/1" 60
}

# stop_up: stops the `tollgate up` start_up (or the gateway start_gateway) started and waits
# for it.
stop_up() { kill "$TG"; wait "$TG" 2>/dev/null || true; }

# served_and_appended API_PORT: the gateway's requests and the collector's appended events so
# far, from the query API's /metrics ("REQUESTS APPENDED").
served_and_appended() {
  curl -s "http://127.0.0.1:$1/metrics" | awk '
    /^tollgate_collector_events_appended_total/ {a = $2}
    /^tollgate_gateway_requests_total/ {r += $2}
    END {printf "%d %d\n", r, a}'
}

# wait_stored API_PORT: waits until the collector has stored every request the gateway counted
# (at least one), failing after 120 s.
wait_stored() {
  local deadline=$((SECONDS + 120)) r a
  while :; do
    read -r r a < <(served_and_appended "$1")
    [ "$a" -ge "$r" ] && [ "$r" -gt 0 ] && return
    [ $SECONDS -lt $deadline ] || { echo "events not stored within 120 s ($a of $r)" >&2; exit 1; }
    sleep 0.2
  done
}

# seeded_store_setup: what the embedded-store benchmarks share. DuckDB for the baseline; the
# release build with the scaled features (the same embedded code path; it shares its compiled
# dependencies with bench-scaled.sh) and the bus seeder (examples/seed_bus.rs); sets BIN, and
# WORK (a temp dir removed on exit, with every background job stopped).
seeded_store_setup() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
  python3 -c 'import duckdb' 2>/dev/null || python3 -m pip install -q duckdb >&2
  cargo build --release --locked --features scaled --bin tollgate --example seed_bus >&2
  BIN="$CARGO_TARGET_DIR/release/tollgate"
  WORK="$(mktemp -d)"
  trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
}

# start_ups BINARY...: one `tollgate up` (launch_up) per binary with the benchmark configuration
# (bench_config), each on its own ports, configuration, log and data directory under $WORK
# (tg<i>.yaml, tg<i>.log, data<i>); waits until each proxies a request. Appends their pids to
# TG_PIDS, their gateway ports to TG_PORTS and their query API ports to TG_APIS.
start_ups() {
  local i=0 bin gw api
  for bin in "$@"; do
    gw=$(port); api=$(port)
    bench_config "$WORK/tg$i.yaml" "$gw" "$api"
    launch_up "$bin" "$WORK/tg$i.yaml" "$WORK/data$i" "$WORK/tg$i.log"
    TG_PIDS+=("$TG"); TG_PORTS+=("$gw"); TG_APIS+=("$api")
    wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$gw/v1/items/1" 60
    i=$((i + 1))
  done
}
