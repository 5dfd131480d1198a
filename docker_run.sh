#!/usr/bin/env bash
# Docker entry point: serve Wyoming on port 10200 with models in /data. Arguments given to
# `docker run` are appended (e.g. --zeroconf, --device cuda); a later --uri wins.
set -euo pipefail
exec /usr/src/.venv/bin/python -m wyoming_soprano \
    --uri 'tcp://0.0.0.0:10200' \
    --data-dir /data \
    "$@"
