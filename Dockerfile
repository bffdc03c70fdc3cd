# syntax=docker/dockerfile:1
#
# PaliGemma inference server image.
#
#   GPU (default):  docker build -t paligemma-server:gpu .
#   CPU:            docker build --build-arg VARIANT=cpu -t paligemma-server:cpu .
#
# The GPU variant needs no CUDA base image: PyPI's torch wheels carry the CUDA runtime, and the host's
# driver comes in through the NVIDIA container toolkit (`--gpus all`, Compose's device reservation or
# Kubernetes' `nvidia.com/gpu`). That keeps both variants on one small Debian base.
#
# Build arguments:
#   BASE_IMAGE          any Debian-bookworm image with python3 (3.11) + venv + pip; replaced by a local
#                       stand-in where no registry is reachable (deploy/check.sh --build does that).
#   VARIANT             gpu | cpu.
#   TORCH_VERSION       the torch release the CPU variant installs.
#   TORCH_CPU_PIP_ARGS  where the CPU variant gets torch. Default: PyTorch's CPU index. Offline, point it
#                       at a wheel folder mounted into the build, e.g.
#                       `podman build -v /opt/wheels:/opt/wheels:ro --build-arg TORCH_CPU_PIP_ARGS="--find-links /opt/wheels" ...`
#   TORCH_GPU_PIP_ARGS  empty (default): the GPU variant takes PyPI's newest torch, whose CUDA build
#                       needs a recent NVIDIA driver (torch 2.15 on PyPI is CUDA 13: driver >= 580).
#                       For older drivers pin a CUDA line, e.g.
#                       `--build-arg TORCH_GPU_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu126"`
#                       (installs torch==TORCH_VERSION from there).
#   MASK_DECODER_FILE   optional path, inside the build context, of vae-oid.npz to bake into the image at
#                       /models/vae-oid.npz (checked against its published size and sha256). Without it,
#                       mount the file there at run time instead (see "Runtime" below).
#
# Runtime:
#   port 8000 (PALIGEMMA_PORT); Hugging Face cache in the volume /data/huggingface (HF_HOME), so a real
#   checkpoint is downloaded once per volume, not once per container; masks turn on when
#   /models/vae-oid.npz exists (mounted or baked in) or PALIGEMMA_MASK_DECODER names a file.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ARG VARIANT=gpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ARG TORCH_GPU_PIP_ARGS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A virtual environment is the one folder the runtime stage copies; it works the same on the official
# python image (python in /usr/local) and on a Debian python3 stand-in.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# pip uses its own CA bundle unless told otherwise; the system bundle is the one that operators extend
# with a corporate (TLS-inspecting) proxy's certificate, so prefer it whenever the base has one.
RUN set -eu; \
    case "$VARIANT" in gpu|cpu) ;; *) echo "VARIANT must be gpu or cpu, got '$VARIANT'" >&2; exit 1;; esac; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    pip install --upgrade pip; \
    # Installed first so that `torch>=2.4` in pyproject.toml is already met: the CPU variant must not
    # pull the ~5 GB CUDA build from PyPI, and a pinned GPU build must not be upgraded.
    if [ "$VARIANT" = cpu ]; then \
        pip install $TORCH_CPU_PIP_ARGS "torch==${TORCH_VERSION}"; \
    elif [ -n "$TORCH_GPU_PIP_ARGS" ]; then \
        pip install $TORCH_GPU_PIP_ARGS "torch==${TORCH_VERSION}"; \
    fi

# Dependencies alone first, read from pyproject.toml, so that editing the code does not reinstall
# torch and transformers (the slow, large layer).
COPY pyproject.toml /src/
RUN set -eu; \
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    if [ "$VARIANT" = cpu ]; then \
        python3 -c 'import torch, sys; sys.exit(0 if not torch.version.cuda else "a CUDA torch got into the CPU image")'; \
    fi

# The package itself (no dependency resolution: everything is there already). README.m[d] is a glob so
# that the build also works while the README does not exist yet.
COPY README.m[d] pyproject.toml /src/
COPY app /src/app
RUN pip install --no-deps /src && rm -rf /src/build

# Optional baked-in mask decoder. A bind mount of the build context (not COPY) because COPY cannot be
# made conditional on a build argument.
ARG MASK_DECODER_FILE=""
RUN --mount=type=bind,target=/context \
    set -eu; mkdir -p /models; \
    if [ -n "$MASK_DECODER_FILE" ]; then \
        cp "/context/$MASK_DECODER_FILE" /models/vae-oid.npz; \
        size=$(stat -c %s /models/vae-oid.npz); \
        [ "$size" = 8479556 ] || { echo "MASK_DECODER_FILE: expected 8479556 bytes, got $size" >&2; exit 1; }; \
        echo "5586010257b8536dddefab65e7755077f21d5672d5674dacf911f73ae95a4447  /models/vae-oid.npz" | sha256sum -c -; \
    fi

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG VARIANT=gpu
LABEL org.opencontainers.image.title="paligemma-server" \
      org.opencontainers.image.description="HTTP inference server for Google's PaliGemma vision-language models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.paligemma.variant="${VARIANT}"

# A fixed non-root uid/gid so that Kubernetes' runAsUser/fsGroup and host-side volume permissions can
# name it. The HF cache and /models are created owned by it so volumes mounted there inherit that.
# --no-log-init: with a high uid, useradd would otherwise write a large sparse /var/log/lastlog.
RUN groupadd --gid 10001 paligemma \
 && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /home/paligemma --create-home \
        --shell /usr/sbin/nologin paligemma \
 && mkdir -p /data/huggingface /models \
 && chown paligemma:paligemma /data/huggingface /models

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=paligemma:paligemma /models /models
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/paligemma-entrypoint

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/huggingface \
    PALIGEMMA_HOST=0.0.0.0 \
    PALIGEMMA_PORT=8000

# Weights are gigabytes: keep them out of the container's writable layer.
VOLUME ["/data/huggingface"]

USER 10001:10001
WORKDIR /home/paligemma
EXPOSE 8000

# uvicorn turns SIGTERM into a graceful drain (PALIGEMMA_DRAIN_TIMEOUT_S, default 30 s): give
# `docker stop` more than that (`-t 45`, Compose's stop_grace_period) or it kills the drain.
STOPSIGNAL SIGTERM

# Liveness only (/healthz): loading a real checkpoint takes minutes and must not mark the container
# unhealthy; readiness (/readyz) is for load balancers and Kubernetes probes. python instead of curl:
# the slim base has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PALIGEMMA_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["/usr/local/bin/paligemma-entrypoint"]
CMD ["python", "-m", "app"]
