# The project image every KFP component runs in (components/image.py: GENCO_IMAGE).
# Build from the repository root:
#   docker build -f Dockerfiles/component.Dockerfile -t REGISTRY/genco:0.1.0 .
# Bookworm is pinned so the serving image's JRE 17 and this image share one Debian release.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU torch first, from its own index: the default index would pull the multi-GB CUDA build.
# The project's "torch==2.13.0" pin is then already satisfied by 2.13.0+cpu.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/genco
COPY pyproject.toml README.md ./
COPY genco/ genco/
# kfp (the component executor) comes with the "pipeline" extra; matplotlib draws the
# evaluation report; "serve" brings torch-model-archiver, with which the deploy step archives
# each promoted version (with serving/'s handler and model config) for TorchServe.
RUN pip install ".[pipeline,serve]" "matplotlib>=3.8"
COPY serving/ /opt/genco/serving/
ENV GENCO_SERVING_DIR=/opt/genco/serving

# Non-root with a numeric id, so Kubernetes' runAsNonRoot can verify it.
RUN useradd --create-home --uid 1000 --user-group genco
USER 1000:1000
WORKDIR /home/genco
ENV MPLCONFIGDIR=/tmp/matplotlib

# KFP replaces the command with its executor; this default makes `docker run IMAGE` useful.
CMD ["genco", "--help"]
