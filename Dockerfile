# Wyoming text-to-speech server for Soprano: port 10200, models downloaded to and cached in /data.
# One file for linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 -t wyoming-soprano .
#   docker run -it -p 10200:10200 -v /path/to/data:/data wyoming-soprano [server arguments]
#   docker run -it --network host -v /path/to/data:/data wyoming-soprano --zeroconf  # mDNS
FROM python:3.11-slim-bookworm

# CPU wheels by default, from an index that has them for both architectures (PyPI's torch for
# Linux, aarch64 included, depends on CUDA). For an NVIDIA GPU, build with a CUDA index, e.g.
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# and run with --gpus all (the server picks CUDA when it is there, or pass --device cuda).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/.huggingface \
    TORCH_EXTENSIONS_DIR=/data/.torch_extensions

# A C++ compiler for the native backend's CPU kernels. They are compiled for the CPU they run on,
# at the first start (about a minute), and kept in /data: never at build time, which may run on
# another CPU or under emulation.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /usr/src

# torch first and from its own index: from PyPI it would bring gigabytes of CUDA libraries.
RUN python -m venv .venv \
    && .venv/bin/pip install --upgrade pip setuptools wheel \
    && .venv/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY setup.cfg pyproject.toml README.md ./
COPY soprano ./soprano
COPY wyoming_soprano ./wyoming_soprano
RUN .venv/bin/pip install ".[wyoming]"

COPY docker_run.sh ./

VOLUME /data
EXPOSE 10200

# A describe round trip, not just an open port. The first start downloads the model before the
# server listens, hence the long start period.
HEALTHCHECK --start-period=10m --interval=30s --timeout=20s --retries=3 \
    CMD ["/usr/src/.venv/bin/python", "-m", "wyoming_soprano.health_check", \
         "--uri", "tcp://127.0.0.1:10200"]

ENTRYPOINT ["bash", "/usr/src/docker_run.sh"]
