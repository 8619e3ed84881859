# TorchServe with the genco handler; serves the model archives the deploy step publishes.
# Build from the repository root:
#   docker build -f Dockerfiles/serving.Dockerfile -t REGISTRY/genco-serving:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# TorchServe's frontend is Java.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

# CPU torch first, from its own index (see component.Dockerfile).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/genco
COPY pyproject.toml README.md ./
COPY genco/ genco/
RUN pip install ".[serve]"
COPY serving/ /opt/genco/serving/

RUN useradd --create-home --home-dir /home/model-server --uid 1000 --user-group model-server \
    && mkdir -p /home/model-server/model-store /home/model-server/logs
COPY Dockerfiles/serving-config.properties /home/model-server/config.properties
COPY serving/log4j2.xml /home/model-server/log4j2.xml
RUN chown -R 1000:1000 /home/model-server
USER 1000:1000
WORKDIR /home/model-server
ENV LOG_LOCATION=/home/model-server/logs

EXPOSE 8080 8081 8082
ENTRYPOINT ["torchserve", "--start", "--foreground", \
    "--ts-config", "/home/model-server/config.properties", \
    "--model-store", "/home/model-server/model-store"]
