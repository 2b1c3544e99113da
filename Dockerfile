# BrainTumorMTL on a GPU: TensorFlow's official GPU image + this package (setup.cfg, extras [dev]).
#
#   docker build -t braintumor-mtl .
#   docker run --rm --gpus all -v "$PWD/data:/workspace/data" -v "$PWD/outputs:/workspace/outputs" \
#       braintumor-mtl python -m src.train phase=3
#
# `--gpus all` needs the NVIDIA driver and the NVIDIA Container Toolkit on the host; without a
# GPU leave it out (TensorFlow falls back to the CPU). The VS Code devcontainer
# (.devcontainer/devcontainer.json) builds this same file. See README "Devcontainer / Docker".
#
# Base image: the tag follows TensorFlow's published naming (tensorflow/tensorflow:<version>-gpu,
# e.g. 2.17.0-gpu ... 2.20.0-gpu: Ubuntu 22.04, Python 3.11, CUDA/cuDNN matching that TF build).
# 2.21.0-gpu was chosen without network access to check it; if that tag is not published yet,
# build with the newest one, e.g. `--build-arg BASE_IMAGE=tensorflow/tensorflow:2.20.0-gpu`
# (pip then upgrades TensorFlow to the 2.21 wheel that setup.cfg requires), or with a CUDA runtime
# image such as nvidia/cuda:12.5.1-cudnn-runtime-ubuntu22.04 plus `pip install "tensorflow[and-cuda]"`.
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ARG USERNAME=btmtl
ARG USER_UID=1000
ARG USER_GID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# OpenCV (headless) needs libgl/glib at import on some bases; git for VS Code; sudo-free non-root user
RUN [ "${USER_UID}" != 0 ] || { echo "USER_UID must not be 0 (the image runs as a non-root user)" >&2; exit 1; } \
 && apt-get update \
 && apt-get install -y --no-install-recommends git libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && (command -v python >/dev/null 2>&1 || ln -s "$(command -v python3)" /usr/local/bin/python) \
 && (getent group "${USER_GID}" >/dev/null || groupadd --gid "${USER_GID}" "${USERNAME}") \
 && if getent passwd "${USER_UID}" >/dev/null; then \
        old="$(getent passwd "${USER_UID}" | cut -d: -f1)"; \
        [ "$old" = "${USERNAME}" ] || usermod --login "${USERNAME}" --home "/home/${USERNAME}" --move-home "$old"; \
    else useradd --uid "${USER_UID}" --gid "${USER_GID}" --create-home --shell /bin/bash "${USERNAME}"; fi \
 && mkdir -p /workspace/data /workspace/outputs \
 && chown -R "${USER_UID}:${USER_GID}" /workspace

WORKDIR /workspace

# Dependencies first (a layer that survives code edits): the package metadata only, then the
# install step: the package from setup.cfg with the dev extras (the same as README and `make`).
COPY --chown=${USER_UID}:${USER_GID} setup.cfg pyproject.toml README.md ./
COPY --chown=${USER_UID}:${USER_GID} src/__init__.py src/__init__.py
RUN python3 -m pip install -e ".[dev]" \
 && python3 -m pip install "jupyterlab>=4,<5"

# The code, configs, notebooks and tests (.dockerignore keeps data, outputs, .env and caches out)
COPY --chown=${USER_UID}:${USER_GID} . .

USER ${USERNAME}
ENV PATH="/home/${USERNAME}/.local/bin:${PATH}"

# Mount points: datasets in, runs (checkpoints, metrics, mlflow.db) out
VOLUME ["/workspace/data", "/workspace/outputs"]
# Jupyter Lab, MLflow UI, TensorBoard
EXPOSE 8888 5000 6006

# The documented command: train the default model on the phantom data (any Hydra override can
# follow: `docker run ... braintumor-mtl python -m src.train model=mtl_unet data=figshare ...`).
CMD ["python", "-m", "src.train", "phase=3"]
