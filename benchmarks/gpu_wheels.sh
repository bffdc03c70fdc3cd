#!/usr/bin/env bash
# Wheels that a GPU host without package registries lacks, for `python -m benchmarks.gpu` there.
#
# The lent GPU machines (Python 3.12, torch with CUDA, an older transformers, no FastAPI stack, no
# network) take the server's missing dependencies as wheels carried in the working tree's git-ignored
# `.whl/` folder. This downloads them here, for CPython 3.12 on x86-64 Linux, at the versions the
# project's lock pins (requirements/base.lock), so the GPU run uses what `make install` would.
# The command that runs the benchmark there is in benchmarks/gpu.py's docstring.
#
#     bash benchmarks/gpu_wheels.sh            # into .whl/ (emptied first)
set -euo pipefail

cd "$(dirname "$0")/.."
LOCK=requirements/base.lock
DEST=.whl
# The server's own imports the GPU image lacks or has too old (transformers 5.17 there), and what
# they need that the image lacks or may have too old (opentelemetry-api for FastAPI, typing-extensions
# >= 4.16 for pydantic, regex for transformers). The image's tokenizers (0.23.2) satisfies transformers;
# from transformers 5.25 on it needs huggingface-hub >= 2.4 (with hf-xet, httpx2, click, typer) and
# kernels (with tomlkit), newer than the image's; peft reads LoRA adapters (benchmarks.gpu --adapters).
# --no-deps below: every wheel is named here.
PACKAGES=(
    fastapi starlette pydantic pydantic-core pydantic-settings typing-inspection annotated-types
    annotated-doc python-dotenv uvicorn python-multipart pycocotools swagger-ui-bundle-v2
    opentelemetry-api typing-extensions transformers regex
    huggingface-hub hf-xet httpx2 click typer kernels tomlkit peft
)

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
        manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -m1 -i "^${name}==" "$LOCK" | awk '{print $1}') || true
    if [[ -z "$pin" ]]; then
        echo "no pin for $name in $LOCK" >&2
        exit 1
    fi
    pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "${pins[@]}"
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST/:"
ls "$DEST"
