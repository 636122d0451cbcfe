# One image for the worker, the CLI (ENTRYPOINT paystream) and the PSP sandbox
# (docker-compose.yml runs it with entrypoint `python -m psp.sandbox`).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
# Every package of [tool.setuptools.packages.find] (tests/ops/test_deploy_files.py checks).
COPY agents agents
COPY topics topics
COPY schemas schemas
COPY sinks sinks
COPY config config
COPY psp psp
COPY ops ops
COPY paystream paystream
COPY benchmarks benchmarks
COPY observability observability
# Not root; /app writable for Faust's data directory (<app id>-data, in the working dir).
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 paystream \
    && chown paystream:paystream /app
USER paystream
# The worker's HTTP port (PAYSTREAM_WEB_PORT): status view, /metrics, /healthz, /readyz.
EXPOSE 8000
ENTRYPOINT ["paystream"]
CMD ["worker"]
