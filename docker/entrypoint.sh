#!/bin/sh
# Container entrypoint: turn masks on when the decoder file is present, then become the server.
#
# PALIGEMMA_MASK_DECODER must name an existing file or the server refuses to start, so the image cannot
# set it unconditionally; instead a file at the documented place (/models/vae-oid.npz, mounted or baked
# in) switches masks on by itself. An explicit PALIGEMMA_MASK_DECODER always wins. The built-in `demo`
# model (the default) brings its own mask decoder; Google's would decode its tokens into nonsense.
set -eu

if [ -z "${PALIGEMMA_MASK_DECODER:-}" ] && [ -f /models/vae-oid.npz ] && [ "${PALIGEMMA_MODEL:-demo}" != demo ]; then
    export PALIGEMMA_MASK_DECODER=/models/vae-oid.npz
fi

# exec: the server is PID 1's process itself, so SIGTERM from `docker stop` / the kubelet reaches
# uvicorn directly and starts the graceful drain.
exec "$@"
