# The tuner image: API server and workers alike (the command picks the role).
#
#   docker build -t tuner .                                   # CPU torch: API, estimate workers
#   docker build -t tuner-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # GPU workers
#
# CUDA builds of torch carry their own CUDA runtime, so the same slim base serves GPU workers;
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit. A different base (for
# example one with a newer Python) is a `--build-arg PYTHON_IMAGE=...` away.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# torch first, from the chosen index: the largest layer, and the one the build arg changes.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY tuner ./tuner
COPY probes ./probes
COPY storage ./storage
COPY api ./api
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 1000 tuner && mkdir -p /data && chown tuner /data
USER tuner
WORKDIR /data
# The embedded default: an SQLite file on the /data volume. Fleets pass a PostgreSQL URL.
ENV TUNER_DATABASE_URL=sqlite:////data/tuner.db
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["tuner"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
