# syntax=docker/dockerfile:1
# One image for the API and the worker (they differ only in the command; see docker-compose.yml).
#
#   docker build -t certified-attention:cu128 .                          # CUDA build of torch (default)
#   docker build -t certified-attention:cpu --build-arg TORCH_VARIANT=cpu .   # CPU-only, much smaller
#
# torch is pinned in pyproject.toml (torch==2.13.0). It is installed first, from the PyTorch wheel
# index of the chosen variant, so that the project's own `torch==2.13.0` requirement is already
# satisfied (2.13.0+cu128 / 2.13.0+cpu match ==2.13.0) and pip never pulls another build.
# No secrets are baked in: the Redis password and API key come from the environment at run time.

ARG PYTHON_IMAGE=python:3.11-slim

# --- stage 1: dependencies in a virtual environment (cached until pyproject.toml changes) --------
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VARIANT=cu128
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The largest layer first: torch only changes when TORCH_VARIANT / TORCH_VERSION change.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"

# The rest of the runtime dependencies, read from pyproject.toml alone (no source needed yet, so
# editing the code does not invalidate this layer).
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

# --- stage 2: runtime ----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cu128
LABEL org.opencontainers.image.title="certified-attention" \
      org.opencontainers.image.description="Attention, tensor attention and LoRA gradients with certified error bounds, as a web service" \
      org.opencontainers.image.torch-variant="${TORCH_VARIANT}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_WAIT_POLICY=PASSIVE \
    HEALTHCHECK_URL=http://127.0.0.1:8000/health/live

# gcc builds the compiled CPU kernel of tensor attention on first use, for the CPU it runs on
# (-march=native; compute/tensor_attention/native/). Without it the PyTorch route runs: same results and bound,
# slower.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app

COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
# Source last: the only layer rebuilt after a code change.
COPY --chown=root:root pyproject.toml ./
COPY --chown=root:root compute ./compute
COPY --chown=root:root app ./app
COPY --chown=root:root workers ./workers
COPY --chown=root:root benchmarks ./benchmarks

USER 10001:10001
EXPOSE 8000 9100

# The API answers /health/live on 8000; the worker's compose service points HEALTHCHECK_URL at its
# metrics port instead. python is used because the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]

# API by default; the worker runs `python -m workers` (docker-compose.yml sets the command).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
