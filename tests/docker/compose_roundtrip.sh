#!/usr/bin/env bash
# End-to-end check of the Dockerfile and docker-compose.yml (`make docker-test`):
#   build the image, start api + PostgreSQL with auth on and a bootstrap admin key, wait for /readyz, check that a
#   request without a key gets 401, enrol one photo of a person with the admin key, create a read key inside the
#   container (`facegate keys create`) and check it may verify but not enrol (403), verify another photo of them
#   (match) and a photo of someone else (no match), check the JSON access log, stop the api (SIGTERM to tini: exit
#   status 0 well within stop_grace_period), then `docker-compose down -v`.
# Needs a docker daemon, docker-compose (or Compose v2), curl and python3 on the host; only loopback traffic.
#
# Settings (environment):
#   FACEGATE_FACES_DIR        photos (default ../shared/faces beside the checkout); uses its dev/ set
#   FACEGATE_BASE_IMAGE       Debian base for the build (default debian:bookworm-slim; falls back to the local
#   FACEGATE_POSTGRES_IMAGE   stand-ins facegate-base:bookworm / facegate-postgres:local built by
#                             ../shared/tools/docker-local.sh when the registry images are not on this machine)
#   FACEGATE_PUBLISH_PORT     host port on 127.0.0.1 (default: a free one)
#   READY_TIMEOUT             seconds to wait for /readyz (default 300)
#   ENROLL_PHOTO / SAME_PHOTO / OTHER_PHOTO   paths relative to the dev set (defaults: Obama, Obama, Biden)
set -euo pipefail
cd "$(dirname "$0")/../.."

faces_dir=${FACEGATE_FACES_DIR:-../shared/faces}/dev
enroll_photo=${ENROLL_PHOTO:-barack_obama/face_recognition__obama.jpg}
same_photo=${SAME_PHOTO:-barack_obama/face_recognition__obama2.jpg}
other_photo=${OTHER_PHOTO:-joe_biden/face_recognition__biden.jpg}
ready_timeout=${READY_TIMEOUT:-300}

log() { printf '[docker-test %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

for tool in docker curl python3; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
docker info >/dev/null 2>&1 || die "no docker daemon (on the dev machine: bash ../shared/tools/docker-local.sh)"
if command -v docker-compose >/dev/null; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  die "neither docker-compose nor the docker compose plugin is installed"
fi
for photo in "$enroll_photo" "$same_photo" "$other_photo"; do
  [ -f "$faces_dir/$photo" ] || die "photo $faces_dir/$photo not found (set FACEGATE_FACES_DIR)"
done

have_image() { docker image inspect "$1" >/dev/null 2>&1; }
if [ -z "${FACEGATE_BASE_IMAGE:-}" ] && ! have_image debian:bookworm-slim && have_image facegate-base:bookworm; then
  export FACEGATE_BASE_IMAGE=facegate-base:bookworm
fi
if [ -z "${FACEGATE_POSTGRES_IMAGE:-}" ] && ! have_image postgres:16 && have_image facegate-postgres:local; then
  export FACEGATE_POSTGRES_IMAGE=facegate-postgres:local
fi
if [ -z "${FACEGATE_PUBLISH_PORT:-}" ]; then
  FACEGATE_PUBLISH_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export FACEGATE_PUBLISH_PORT
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-facegate_roundtrip}
# The compose file's first admin key (stored hashed by the service at start); a fresh one per run.
FACEGATE_BOOTSTRAP_KEY=$(python3 -c 'import secrets; print(f"fg_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}")')
export FACEGATE_BOOTSTRAP_KEY
admin_key=$FACEGATE_BOOTSTRAP_KEY
base_url="http://127.0.0.1:$FACEGATE_PUBLISH_PORT"
dc() { "${compose[@]}" -f docker-compose.yml "$@"; }

# Both made before the trap: cleanup names them, and under `set -u` an unset one ended it at once (a failed build or
# `up` then left the containers and volumes behind, and their logs unshown).
body=$(mktemp)
headers=$(mktemp)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  rm -f "$body" "$headers"
  if [ "$rc" -ne 0 ]; then
    log "logs of the failed run:"
    dc logs --no-color --tail=150 >&2 || true
  fi
  log "docker-compose down -v"
  dc down -v --remove-orphans >/dev/null 2>&1 || log "docker-compose down -v failed"
  exit "$rc"
}
dc down -v --remove-orphans >/dev/null 2>&1 || true  # leftovers of a killed run
trap cleanup EXIT
trap 'exit 130' INT TERM

log "building (base ${FACEGATE_BASE_IMAGE:-debian:bookworm-slim}, db ${FACEGATE_POSTGRES_IMAGE:-postgres:16})"
started=$SECONDS
dc build api
log "built in $((SECONDS - started)) s: $(docker image inspect --format '{{.Size}}' "${FACEGATE_API_IMAGE:-facegate:latest}" | awk '{printf "%.0f MB", $1 / 1e6}')"

log "starting db and api on 127.0.0.1:$FACEGATE_PUBLISH_PORT"
dc up -d

# Every response goes through one JSON check: `expect STATUS FILE PYTHON-EXPR` evaluates the expression with the
# parsed body as `r` and fails (printing the body) unless both the HTTP status and the expression hold.
expect() {
  local want=$1 status=$2 body=$3 check=$4
  python3 - "$want" "$status" "$body" "$check" <<'PY' || return 1
import json, sys
want, status, path, check = sys.argv[1:]
text = open(path).read()
try:
    r = json.loads(text)
except ValueError:
    sys.exit(f"HTTP {status}, not JSON: {text[:500]}")
print(json.dumps(r, indent=2, sort_keys=True))
if status != want:
    sys.exit(f"expected HTTP {want}, got {status}")
if not eval(check, {}, {"r": r}):
    sys.exit(f"check failed: {check}")
PY
}
post() {  # post PATH curl-form-args...  -> prints the HTTP status, body in $body
  local path=$1; shift
  curl --silent --show-error --max-time 120 --noproxy '*' -o "$body" -w '%{http_code}' "$@" "$base_url$path"
}

log "waiting for /readyz (at most $ready_timeout s)"
waited=$SECONDS
deadline=$((SECONDS + ready_timeout))
while :; do
  status=$(curl --silent --max-time 5 --noproxy '*' -o "$body" -w '%{http_code}' "$base_url/readyz" || true)
  [ "$status" = 200 ] && break
  api=$(dc ps -q api)
  if [ -n "$api" ] && [ "$(docker inspect --format '{{.State.Status}}' "$api")" != running ]; then
    die "the api container exited"
  fi
  [ "$SECONDS" -lt "$deadline" ] || die "/readyz not 200 after $ready_timeout s (last status ${status:-none})"
  sleep 2
done
log "ready after $((SECONDS - waited)) s"
expect 200 "$status" "$body" 'True'

api=$(dc ps -q api)
for _ in $(seq 1 45); do
  health=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$api")
  [ "$health" = starting ] || break
  sleep 2
done
[ "$health" = healthy ] || die "the api container's HEALTHCHECK says '${health:-nothing}'"
log "api container HEALTHCHECK: $health"

uid=$(dc exec -T api id -u) || die "docker-compose exec api failed"
[ "$uid" != 0 ] || die "the api container runs as root"
log "api runs as uid $uid"

log "POST /enroll without an API key (auth is on: 401)"
status=$(post /enroll -D "$headers" -F "image=@$faces_dir/$enroll_photo" -F "name=nobody")
expect 401 "$status" "$body" 'r["error"]["code"] == "unauthorized"' || die "/enroll without a key"
grep -qi '^www-authenticate:.*X-API-Key' "$headers" || die "the 401 has no WWW-Authenticate header"

log "POST /enroll $enroll_photo (bootstrap admin key)"
status=$(post /enroll -H "X-API-Key: $admin_key" -F "image=@$faces_dir/$enroll_photo" -F "name=$(dirname "$enroll_photo")")
enrolled=$(expect 201 "$status" "$body" 'r["identity_id"] and r["created"] is True') \
  || { printf '%s\n' "$enrolled"; die "/enroll"; }
printf '%s\n' "$enrolled"
identity_id=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["identity_id"])' "$body")

log "facegate keys create --scope read (inside the api container)"
read_key=$(dc exec -T api facegate keys create --name roundtrip --scope read 2>/dev/null | tr -d '\r') \
  || die "facegate keys create failed in the container"
case $read_key in fg_*) ;; *) die "facegate keys create printed '$read_key', not a key" ;; esac
status=$(post /enroll -H "X-API-Key: $read_key" -F "image=@$faces_dir/$same_photo" -F "identity_id=$identity_id")
expect 403 "$status" "$body" 'r["error"]["code"] == "forbidden"' || die "a read key may not enrol"

log "POST /verify $same_photo against identity $identity_id (same person, read key)"
status=$(post /verify -H "X-API-Key: $read_key" -F "image=@$faces_dir/$same_photo" -F "identity_id=$identity_id")
expect 200 "$status" "$body" 'r["match"] is True and r["distance"] <= r["threshold"]' || die "/verify same person"

log "POST /verify $other_photo against identity $identity_id (someone else)"
status=$(post /verify -H "X-API-Key: $read_key" -F "image=@$faces_dir/$other_photo" -F "identity_id=$identity_id")
expect 200 "$status" "$body" 'r["match"] is False and r["distance"] > r["threshold"]' || die "/verify other person"

# The gallery really is in the compose PostgreSQL, not in a SQLite file inside the container.
# shellcheck disable=SC2016  # $POSTGRES_* expand inside the db container
faces=$(dc exec -T db sh -c 'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tAc "SELECT count(*) FROM faces"' | tr -d '[:space:]') \
  || die "could not query PostgreSQL"
[ "$faces" = 1 ] || die "expected 1 face row in PostgreSQL, found '$faces'"
log "PostgreSQL holds $faces enrolled face"

# shellcheck disable=SC2016
keys=$(dc exec -T db sh -c 'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tA -F : -c "SELECT prefix, key_hash FROM api_keys"' | tr -d '\r') \
  || die "could not read api_keys"
# (here-strings, not pipes: with pipefail, `grep -q` leaving early could fail the writer and flip the test)
grep -q "^${admin_key:3:8}:" <<<"$keys" || die "the bootstrap key is not in api_keys"
if grep -qF -e "${admin_key#fg_*_}" -e "${read_key#fg_*_}" <<<"$keys"; then
  die "a key's secret is stored in api_keys"
fi
log "api_keys holds $(grep -c . <<<"$keys") keys, hashed"

# The access log: JSON, one line per request, with the key's prefix and never the key.
logs=$(dc logs --no-color api)
if grep -qF -e "$admin_key" -e "$read_key" <<<"$logs"; then die "an API key appears in the api's log"; fi
python3 -c '
import json, sys
lines = [json.loads(l[l.index("{"):]) for l in sys.stdin if "\"facegate.access\"" in l]
seen = {(a["route"], a["status"], a.get("decision")) for a in lines}
want = {("/enroll", 401, None), ("/enroll", 201, None), ("/enroll", 403, None), ("/verify", 200, "match"), ("/verify", 200, "no_match")}
assert want <= seen, seen
' <<<"$logs" || die "the JSON access log lacks the requests made"
log "access log: JSON lines for every request, keys by prefix only"

# docker-compose stop: SIGTERM to tini (PID 1), passed on to `facegate serve`, which finishes what is in flight
# (FACEGATE_SHUTDOWN_TIMEOUT) and exits 0, well before compose's SIGKILL at stop_grace_period.
[ "$(dc exec -T api cat /proc/1/comm | tr -d '\r')" = tini ] || die "PID 1 of the api container is not tini"
grace=$(python3 -c 'import re, sys; print(re.search(r"stop_grace_period: (\d+)s", open("docker-compose.yml").read()).group(1))')
log "docker-compose stop api (SIGTERM; SIGKILL after ${grace} s)"
stopping=$SECONDS
dc stop api >/dev/null 2>&1 || die "docker-compose stop api failed"
took=$((SECONDS - stopping))
code=$(docker inspect --format '{{.State.ExitCode}}' "$api")
[ "$code" = 0 ] || die "the api exited with status $code after SIGTERM (expected 0)"
[ "$took" -lt "$grace" ] || die "the api took ${took} s to stop: killed at the grace period"
stopped_logs=$(dc logs --no-color api)  # read whole first: `dc logs | grep -q` failed the test when grep left early
grep -q '"Application shutdown complete."' <<<"$stopped_logs" || die "no clean application shutdown in the log"
log "api stopped in ${took} s, exit status 0, after a clean application shutdown"

log "PASS"
