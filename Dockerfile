# llmgw in a standard Python service image. The database lives on the /data
# volume and is created when the container starts, never baked into the image.
# Provider keys and the admin token come from the environment:
#   OPENAI_API_KEY, ANTHROPIC_API_KEY, <NAME>_API_KEY, LLMGW_ADMIN_TOKEN
# On an air-gapped network, point PYTHON_IMAGE at a mirror's copy of the same
# image (any image with python and pip on PATH works):
#   docker build --build-arg PYTHON_IMAGE=registry.internal/python:3.12-slim .
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    CONFIG_PATH=/app/config.yaml \
    DB_PATH=/data/gateway.db

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 10001 --home-dir /app llmgw \
    && mkdir /data && chown llmgw /data
COPY --chown=llmgw llmgw.py cli.py config.yaml ./
# Compiled once here: `cli.py serve` then imports llmgw from its .pyc, which
# keeps about 6 MB of compiler scratch memory out of every running gateway.
RUN python -m compileall -q llmgw.py

USER llmgw
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
# init is idempotent: it creates the database on the volume on first start.
CMD ["sh", "-c", "python cli.py init > /dev/null && exec python cli.py serve"]
