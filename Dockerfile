# syntax=docker/dockerfile:1
# Training image: NVIDIA's NGC PyTorch container plus this project.
#   docker build -t open-pretrain:25.04 .
#   enroot import -o open-pretrain.sqsh dockerd://open-pretrain:25.04   # for pyxis (docs/slurm.md)
#
# Base: NGC PyTorch 25.04 (April 2025; PyTorch 2.7 on CUDA 12.9, Python 3.12). NGC PyTorch
# images ship PyTorch, CUDA, cuDNN, NCCL and Transformer Engine (preinstalled since 22.09),
# built together and tested; apex and flash-attn have been in them as well, and the check
# below prints what this tag has. Never reinstall torch from PyPI over NGC's build: the wheel
# brings a different CUDA/NCCL and drops the NGC kernels. Since 25.03 the images pin their
# packages in /etc/pip/constraint.txt (PIP_CONSTRAINT), which also guards against that.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Megatron's TP/SP communication overlap needs in-order kernel issue on one hardware queue.
ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/open-pretrain

# Dependencies first (cached across code changes). megatron-core with --no-deps: its only
# requirements (torch, numpy, packaging) are NGC's; everything else here is torch-free.
RUN pip install --no-deps "megatron-core>=0.16.1,<0.18" \
 && pip install "hydra-core>=1.3,<1.4" "omegaconf>=2.3" "sentencepiece>=0.2" "nltk>=3.8" \
        "wandb>=0.17" "tqdm>=4.66" "psutil>=5.9" "zstandard>=0.22" "scipy>=1.10" \
        "hydra-submitit-launcher>=1.2"

COPY . .
# The project itself, editable and without dependencies (which would pull torch from PyPI).
RUN pip install --no-deps -e . \
 && python - <<'PY'
from importlib import metadata
for name in ("torch", "transformer_engine", "apex", "flash_attn", "megatron-core", "hydra-core"):
    try:
        print(f"{name:20s} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name:20s} not installed")
metadata.version("transformer_engine")  # fail the build without TE: the GPU path needs it
PY

# Optional non-root user: docker build --build-arg RUN_AS=trainer. Under pyxis/enroot the
# container runs as the submitting user anyway, so the default stays root.
ARG RUN_AS=root
# No fixed UID: Ubuntu 24.04 bases (NGC 24.xx+) already have uid 1000 ("ubuntu").
RUN useradd --create-home trainer
USER ${RUN_AS}

CMD ["bash"]
