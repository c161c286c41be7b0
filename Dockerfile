# syntax=docker/dockerfile:1
# One process per container: ingest and workers share one event loop. Scale with replicas
# on PostgreSQL, never with several processes on one SQLite file.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /srv hydrator \
 && mkdir -p /srv/data && chown hydrator /srv/data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DATABASE_URL=sqlite:////srv/data/hydrator.db
WORKDIR /srv
USER hydrator
VOLUME ["/srv/data"]
EXPOSE 8000
# Liveness without curl in the image: the standard library is enough.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# exec form: the service is PID 1's only child-free process and gets SIGTERM directly.
# Keep the orchestrator's grace period above SHUTDOWN_GRACE_SECONDS + 5 s (default 25 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["clopos-hydrator"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
