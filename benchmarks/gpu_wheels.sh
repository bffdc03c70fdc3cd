#!/usr/bin/env bash
# Wheels that a GPU host without package registries lacks, for `python -m benchmarks.gpu` there.
#
# The lent GPU machines (Python 3.12, torch with CUDA, an older transformers, no FastAPI stack, no
# network) take the server's missing dependencies as wheels carried in the working tree's git-ignored
# `.whl/` folder. This downloads them here, for CPython 3.12 on x86-64 Linux, at the versions the
# project's lock pins (requirements/base.lock), so the GPU run uses what `make install` would.
# The command that runs the benchmark there is in benchmarks/gpu.py's docstring.
#
#     bash benchmarks/gpu_wheels.sh                 # into .whl/ (emptied first)
#     bash benchmarks/gpu_wheels.sh --quantization  # and torchao + bitsandbytes, for --quantized
set -euo pipefail

cd "$(dirname "$0")/.."
LOCK=requirements/base.lock
DEST=.whl
# The server's own imports the GPU image lacks or has too old (transformers 5.17 there), and what
# they need that the image lacks or may have too old (opentelemetry-api for FastAPI, typing-extensions
# >= 4.16 for pydantic, regex for transformers). The image's huggingface-hub (1.33) and tokenizers
# (0.23.2) no longer satisfy transformers: huggingface-hub 2.4 (with its httpx2, httpcore2, click,
# a newer-than-1.6 hf-xet the image has) and tokenizers travel too. peft reads LoRA adapters
# (benchmarks.gpu --adapters), and imports accelerate. --no-deps below: every wheel is named here.
PACKAGES=(
    fastapi starlette pydantic pydantic-core pydantic-settings typing-inspection annotated-types
    annotated-doc python-dotenv uvicorn python-multipart pycocotools swagger-ui-bundle-v2
    opentelemetry-api typing-extensions transformers regex
    huggingface-hub httpx2 httpcore2 click tokenizers truststore idna anyio h11
    peft accelerate
)
QUANTIZATION_LOCK=requirements/quantization.lock
QUANTIZATION_PACKAGES=(torchao bitsandbytes)

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

if [[ "${1:-}" == "--quantization" ]]; then
    for name in "${QUANTIZATION_PACKAGES[@]}"; do
        pin=$(grep -m1 -i "^${name}==" "$QUANTIZATION_LOCK" | awk '{print $1}')
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$DEST" "$pin"
    done
    # The bitsandbytes wheel holds a library per CUDA and ROCm version (43 MB), which with the rest passes
    # the 64 MiB a device call carries. The image's torch is built for CUDA 13, so only the CUDA 13
    # libraries stay; pip does not check RECORD hashes of files a wheel no longer holds.
    wheel=$(ls "$DEST"/bitsandbytes-*.whl)
    zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so'
fi
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST/:"
ls "$DEST"
