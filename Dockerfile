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

# Dependencies first (cached across code changes), at the exact versions CI tests
# (constraints.txt, shared with the Makefile): the same megatron-core as CI, and transformers,
# safetensors, lm-eval, matplotlib, plotly and tensorboard for export, import, evaluation,
# reports and the gallery. megatron-core goes in with --no-deps: its only requirements (torch,
# numpy, packaging) are NGC's. The rest resolves under NGC's own constraint file as well
# (PIP_CONSTRAINT), so torch is never replaced; a version clash fails the build here.
COPY constraints.txt ./
RUN grep '^megatron-core==' constraints.txt > /tmp/megatron-core.txt \
 && pip install --no-deps -r /tmp/megatron-core.txt \
 && grep -v '^megatron-core==' constraints.txt > /tmp/packages.txt \
 && pip install -r /tmp/packages.txt \
 && rm /tmp/megatron-core.txt /tmp/packages.txt

COPY . .
# The project itself, editable and without dependencies (which would pull torch from PyPI).
# check_versions fails the build when any package differs from constraints.txt.
RUN pip install --no-deps -e . \
 && python launch/check_versions.py --require-all \
 && python - <<'PY'
from importlib import metadata
for name in ("torch", "transformer_engine", "apex", "flash_attn", "megatron-core", "hydra-core",
             "transformers", "lm_eval"):
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
