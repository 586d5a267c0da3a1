#!/usr/bin/env bash
# Pins every base image of the repository's Dockerfiles by digest: each `FROM image:tag[@sha256:…]`
# becomes `FROM image:tag@sha256:<the digest the registry serves for that tag now>`. A tag is
# mutable (python:3.11.10-slim-bookworm is rebuilt when Debian patches a package); the digest is
# not, so a build takes exactly the image that was reviewed.
#
#   scripts/pin-base-images.sh                         re-pin each FROM at the digest of its tag
#   scripts/pin-base-images.sh --python 3.11.12-slim-bookworm
#                                                      move every python:… FROM to that tag, pinned
#   scripts/pin-base-images.sh --compose               also pin docker-compose.yml's third-party
#                                                      images (rabbitmq, mongo, prometheus, grafana)
#   scripts/pin-base-images.sh --dry-run …             print the new lines, change nothing
#
# The digest is the one of the tag's manifest list (all platforms), asked of the registry with
# `crane digest` or, failing that, `docker buildx imagetools inspect`; one of them must be on PATH,
# with access to the registry. Stages of the same file (`FROM build`, `FROM ${SERVICE}`) are left
# alone. Run the deploy tests afterwards (tests/deploy/test_build.py, test_compose.py, which lints
# the Dockerfiles with hadolint) and commit the change with where the digests came from.
set -euo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { echo "pin-base-images.sh: $*" >&2; }

PYTHON_TAG=""
COMPOSE=0
DRY_RUN=0
while (($#)); do
  case "$1" in
    --python) PYTHON_TAG="${2:?--python needs a tag such as 3.11.12-slim-bookworm}"; shift 2 ;;
    --compose) COMPOSE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) say "unknown argument: $1"; exit 2 ;;
  esac
done

digest_of() {  # image:tag -> sha256:…
  local ref="$1" digest=""
  if command -v crane >/dev/null; then
    digest="$(crane digest "$ref")"
  elif command -v docker >/dev/null && docker buildx version >/dev/null 2>&1; then
    digest="$(docker buildx imagetools inspect "$ref" --format '{{json .Manifest}}' \
      | python3 -c 'import json, sys; print(json.load(sys.stdin)["digest"])')"
  else
    say "neither crane nor docker buildx is available: cannot ask the registry for $ref"
    exit 1
  fi
  [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || { say "no digest for $ref (got '$digest')"; exit 1; }
  echo "$digest"
}

# Each tag is asked once; pinned() runs in a subshell, so the answers are kept in a file. The new
# files are written beside them in WORK and moved into place only once every digest is known.
WORK="$(mktemp -d)"
RESOLVED="$WORK/resolved"
: >"$RESOLVED"
trap 'rm -rf "$WORK"' EXIT
pinned() {  # image:tag[@digest] -> image:tag@digest
  local ref="${1%@*}" digest
  # Our own images (registration-bridge/…) are built from this tree, not pulled: left alone.
  if [[ "$ref" == registration-bridge/* ]]; then
    echo "$1"
    return
  fi
  if [[ -n "$PYTHON_TAG" && "$ref" =~ ^(docker\.io/library/)?python: ]]; then
    ref="${ref%%:*}:$PYTHON_TAG"
  fi
  digest="$(awk -v ref="$ref" '$1 == ref { print $2 }' "$RESOLVED")"
  if [[ -z "$digest" ]]; then
    digest="$(digest_of "$ref")" || exit 1
    echo "$ref $digest" >>"$RESOLVED"
    say "$ref -> $digest"
  fi
  echo "$ref@$digest"
}

declare -a PENDING=()
rewrite() {  # file, a regex, and the numbers of its groups: line start, reference, line end
  local file="$1" pattern="$2" head="$3" refgroup="$4" tail="$5" out line ref
  out="$WORK/${#PENDING[@]}"
  : >"$out"
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ $pattern ]]; then
      ref="$(pinned "${BASH_REMATCH[$refgroup]}")" || exit 1
      line="${BASH_REMATCH[$head]}$ref${BASH_REMATCH[$tail]}"
    fi
    printf '%s\n' "$line" >>"$out"
  done <"$file"
  PENDING+=("$file")
}

# An image reference has a tag (`name:tag`) and maybe a digest already; a stage name or `${ARG}`
# has no colon, so `FROM build` and `FROM ${SERVICE}` never match.
REF='([a-z0-9][a-z0-9._/-]*:[A-Za-z0-9._-]+)(@sha256:[0-9a-f]{64})?'
mapfile -t DOCKERFILES < <(git ls-files '*Dockerfile' '*.Dockerfile')
for file in "${DOCKERFILES[@]}"; do
  rewrite "$file" "^([Ff][Rr][Oo][Mm][[:space:]]+(--platform=[^[:space:]]+[[:space:]]+)?)$REF([[:space:]].*)?\$" 1 3 5
done
if ((COMPOSE)); then
  rewrite docker-compose.yml "^([[:space:]]*image:[[:space:]]*)$REF([[:space:]]+#.*)?\$" 1 2 4
fi

for i in "${!PENDING[@]}"; do
  file="${PENDING[$i]}"
  if ((DRY_RUN)); then
    diff -u --label "$file" --label "$file (pinned)" "$file" "$WORK/$i" || true
  elif ! cmp -s "$file" "$WORK/$i"; then
    cat "$WORK/$i" >"$file"  # keeps the file's mode
    say "rewrote $file"
  fi
done
