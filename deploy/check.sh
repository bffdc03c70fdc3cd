#!/usr/bin/env bash
# Verifies the deployment files with whatever this machine allows, and says what it could not check.
#
#   deploy/check.sh            static checks (seconds): Kubernetes rendering, promtool, dashboard,
#                              Compose files, Dockerfile
#   deploy/check.sh --build    also build the CPU image with podman and run it as Kubernetes would
#                              (read-only root, no capabilities, an API key set): readiness, caption,
#                              a bad upload, /metrics, a real Prometheus running the dashboard's
#                              queries against it, SIGTERM with 32 requests in flight (minutes)
#
# Options (with --build):
#   --base-image IMG   base for the build (default: python:3.11-slim-bookworm if present or pullable,
#                      else the local stand-in localhost/python-base:bookworm, made with debootstrap)
#   --port N           port the container listens on (host network; default: a free one)
#   --ready-timeout S  seconds to wait for /readyz (default 300)
# The image (localhost/paligemma-server:cpu-check) is kept: it is the layer cache of the next build.
#
# Missing tools are installed with scripts/install-system-deps.sh when running as root; otherwise the
# step fails and says what to install. Everything started here (container, Prometheus) is removed on
# exit, whatever happens.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

BUILD=0
BASE_IMAGE=${BASE_IMAGE:-}
PORT=""
READY_TIMEOUT=300
IMAGE=localhost/paligemma-server:cpu-check
STANDIN=localhost/python-base:bookworm
while [ $# -gt 0 ]; do
    case "$1" in
        --build) BUILD=1 ;;
        --base-image) BASE_IMAGE=$2; shift ;;
        --port) PORT=$2; shift ;;
        --ready-timeout) READY_TIMEOUT=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# PyYAML is needed; the project's virtualenv has it (transformers depends on it).
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
"$PY" -c 'import yaml' 2>/dev/null || { echo "$PY cannot import yaml: run from the project's venv (pip install .)" >&2; exit 2; }

WORK=$(mktemp -d -t paligemma-check.XXXXXX)
CONTAINER=""
PROM_PID=""
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
section "1. Kubernetes: kubectl kustomize deploy/kubernetes"
if ensure_tools kubectl; then
    echo "  $(kubectl version --client 2>/dev/null | head -2 | tr '\n' ' ')"
    if kubectl kustomize deploy/kubernetes >"$WORK/rendered.yaml" 2>"$WORK/kustomize.err"; then
        pass "base renders ($(grep -c '^kind:' "$WORK/rendered.yaml") objects)"
        if "$PY" deploy/validate.py kubernetes "$WORK/rendered.yaml"; then
            pass "rendered base: probes, grace period vs drain, GPU, config/secret, HPA, PDB, scraping"
        else
            fail "rendered base is inconsistent (see above)"
        fi
        if grep -q '^kind: Secret' "$WORK/rendered.yaml"; then fail "the base renders a Secret"; fi
    else
        cat "$WORK/kustomize.err" >&2
        fail "kubectl kustomize deploy/kubernetes"
    fi
    # The example PVC patch, applied from an overlay the way the README shows (in a temporary
    # directory: an overlay cannot live inside its base).
    overlay="$WORK/overlay"
    "$PY" deploy/validate.py example-overlay "$overlay"
    if kubectl kustomize "$overlay" 2>&1 | grep -q 'claimName: paligemma-models'; then
        pass "examples/persistent-volumes patch applies on the base"
    else
        fail "examples/persistent-volumes does not apply (kubectl kustomize $overlay)"
    fi
else
    fail "kubectl unavailable"
fi

# ------------------------------------------------------------------------------------------------
section "2. Prometheus: promtool"
if ensure_tools promtool; then
    if promtool check config deploy/prometheus/prometheus.yml; then
        pass "promtool check config deploy/prometheus/prometheus.yml (with alerts.yml)"
    else
        fail "promtool check config deploy/prometheus/prometheus.yml"
    fi
    "$PY" deploy/validate.py promql-rules "$WORK/dashboard-rules.yml"
    if promtool check rules "$WORK/dashboard-rules.yml" >/dev/null; then
        pass "every dashboard query is valid PromQL (promtool check rules)"
    else
        promtool check rules "$WORK/dashboard-rules.yml" || true
        fail "dashboard queries do not parse"
    fi
    # Debian's promtool has no Kubernetes service discovery: check the rest of the example with a
    # static target in its place.
    if promtool check config deploy/kubernetes/examples/prometheus-kubernetes.yml >/dev/null 2>&1; then
        pass "promtool check config deploy/kubernetes/examples/prometheus-kubernetes.yml"
    elif "$PY" deploy/validate.py k8s-scrape-config "$WORK/k8s-scrape.yml" >/dev/null \
            && promtool check config "$WORK/k8s-scrape.yml" >/dev/null; then
        pass "examples/prometheus-kubernetes.yml (relabelling checked by promtool with a static target: this promtool lacks kubernetes_sd)"
    else
        fail "deploy/kubernetes/examples/prometheus-kubernetes.yml"
    fi
else
    fail "promtool unavailable"
fi

# ------------------------------------------------------------------------------------------------
section "3+4. Grafana dashboard, Compose files, Dockerfile"
if "$PY" deploy/validate.py static; then
    pass "dashboard JSON + metric names, Grafana provisioning, Compose files, Prometheus target, Dockerfile"
else
    fail "static file checks (see above)"
fi
if docker compose version >/dev/null 2>&1; then
    if docker compose -f docker-compose.yml config -q && docker compose -f docker-compose.yml -f docker-compose.cpu.yml config -q; then
        pass "docker compose config (GPU and CPU)"
    else
        fail "docker compose config"
    fi
elif command -v podman-compose >/dev/null 2>&1 && podman-compose --help 2>&1 | grep -qw config; then
    # Newer podman-compose has `config`; it cannot read `!reset`, so only the base file.
    if podman-compose -f docker-compose.yml config >/dev/null; then
        pass "podman-compose config (docker-compose.yml)"
    else
        fail "podman-compose config"
    fi
else
    skip "no docker compose / podman-compose with a \`config\` command: Compose files checked by deploy/validate.py only (step 3)"
fi

# ------------------------------------------------------------------------------------------------
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
    [ "$(id -u)" = 0 ] || { echo "  debootstrap needs root" >&2; return 1; }
    local root="$WORK/rootfs" started=$SECONDS
    # Debian's python3 (3.11 on bookworm) stands in for the official image's.
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
    # The host's bundle: it trusts whatever TLS proxy stands between this machine and PyPI.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    tar -C "$root" -c . | "${PODMAN[@]}" import -q - "$STANDIN" >/dev/null
    rm -rf "$root"
    echo "  made $STANDIN with debootstrap in $((SECONDS - started)) s"
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
    prom_port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
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

build_and_run() {
    ensure_tools podman curl || { fail "podman unavailable"; return; }
    if [ ! -f app/__main__.py ] || [ ! -f app/main.py ]; then
        fail "app/__main__.py or app/main.py missing: the server code is not complete, nothing to run"
        return
    fi
    resolve_base_image || { fail "no base image"; return; }
    echo "  base image: $BASE_IMAGE"
    # podman's defaults fail in some sandboxes (rlimits, crun): fall back to the settings that work there.
    if ! podman_works "$BASE_IMAGE"; then
        printf '[containers]\ndefault_ulimits = []\n' >"$WORK/containers.conf"
        export CONTAINERS_CONF="$WORK/containers.conf"
        PODMAN=(podman --runtime runc)
        podman_works "$BASE_IMAGE" || { fail "podman cannot run containers here"; return; }
        echo "  podman: using CONTAINERS_CONF (default_ulimits = []) and --runtime runc"
    fi

    # A CPU torch wheel on disk (pip's find-links) saves the download from PyTorch's index.
    local wheel_args=() wheel_dir
    wheel_dir=$(pip config get global.find-links 2>/dev/null || true)
    wheel_dir=${wheel_dir:-/opt/wheels}
    if ls "$wheel_dir"/torch-2.13.0*cpu*.whl >/dev/null 2>&1; then
        wheel_args=(-v "$wheel_dir:$wheel_dir:ro" --build-arg "TORCH_CPU_PIP_ARGS=--find-links $wheel_dir")
        echo "  torch: CPU wheel from $wheel_dir"
    fi
    local started=$SECONDS
    # --format docker keeps HEALTHCHECK (the OCI format has no field for it); host network because
    # podman's default network does not work in every sandbox and pip needs to reach PyPI.
    if ! "${PODMAN[@]}" build --format docker --network host "${wheel_args[@]}" \
            --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg VARIANT=cpu -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
        tail -40 "$WORK/build.log" >&2
        fail "podman build (CPU variant)"
        return
    fi
    local size
    size=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE")
    pass "podman build VARIANT=cpu in $((SECONDS - started)) s: $IMAGE, $((size / 1000000)) MB"

    # The entrypoint turns masks on when /models/vae-oid.npz exists. No real decoder here: an empty
    # stand-in file, and `env` as the command instead of the server.
    : >"$WORK/vae-oid.npz"
    if "${PODMAN[@]}" run --rm --network host -v "$WORK/vae-oid.npz:/models/vae-oid.npz:ro" "$IMAGE" env 2>/dev/null \
            | grep -qx 'PALIGEMMA_MASK_DECODER=/models/vae-oid.npz' \
        && ! "${PODMAN[@]}" run --rm --network host "$IMAGE" env 2>/dev/null | grep -q '^PALIGEMMA_MASK_DECODER='; then
        pass "entrypoint sets PALIGEMMA_MASK_DECODER only when /models/vae-oid.npz is mounted"
    else
        fail "entrypoint's mask decoder detection"
    fi

    [ -n "$PORT" ] || PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
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
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' -F image=@"$WORK/test.png" "http://127.0.0.1:$PORT/v1/caption" || true)
    if [ "$code" = 401 ]; then pass "POST /v1/caption without the API key -> 401"; else fail "POST /v1/caption without the API key -> $code"; fi
    code=$(curl -s -o "$WORK/caption.json" -w '%{http_code}' "${AUTH[@]}" -F image=@"$WORK/test.png" -F language=en \
        "http://127.0.0.1:$PORT/v1/caption" || true)
    if [ "$code" = 200 ] && "$PY" -c 'import json, sys; body = json.load(open(sys.argv[1])); assert isinstance(body["text"], str), body' "$WORK/caption.json"; then
        pass "POST /v1/caption -> 200 $(head -c 160 "$WORK/caption.json")"
    else
        fail "POST /v1/caption -> $code $(head -c 300 "$WORK/caption.json" 2>/dev/null)"
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
}

section "5. Container image (podman)"
if [ "$BUILD" = 1 ]; then
    build_and_run
else
    skip "image build and run: pass --build (takes minutes)"
fi
skip "GPU image and GPU scheduling (needs an NVIDIA GPU + container toolkit / a cluster): not checked here"

printf '\n== Summary: %d passed, %d failed, %d skipped\n' "${#PASSED[@]}" "${#FAILED[@]}" "${#SKIPPED[@]}"
for item in "${FAILED[@]}"; do echo "  FAILED: $item"; done
[ ${#FAILED[@]} -eq 0 ]
