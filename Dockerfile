# One image for the worker, the PSP sandbox and the CLI.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agents agents
COPY topics topics
COPY schemas schemas
COPY sinks sinks
COPY config config
COPY psp psp
COPY ops ops
COPY paystream paystream
RUN pip install --no-cache-dir .
ENTRYPOINT ["paystream"]
CMD ["worker"]
