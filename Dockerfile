# The image of `clopos-hydrator serve`. Build: `docker build -t clopos-hydrator .`
# (`make container-check` builds it, runs it and checks it end to end).
#
# No `# syntax=` line on purpose: that makes BuildKit pull a frontend image from a registry,
# and this file must also build where no registry can be reached (the legacy builder too).
#
# Build arguments, so the same file builds in a locked-down network:
#   BASE_IMAGE     any Debian-like image with Python 3.11+ and the venv module (a mirror's
#                  python:3.11-slim, or one made with debootstrap + `docker import`)
#   PIP_INDEX_URL  the package index to install the locked dependencies from
#   EXTRA_CA_PEM   PEM text of one more CA to trust while installing (a TLS-inspecting proxy),
#                  e.g. --build-arg EXTRA_CA_PEM="$(cat corp-ca.crt)"
# They are used in the build stage only; the final image keeps none of them.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG EXTRA_CA_PEM=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL}
RUN python3 -m venv /opt/venv
# Dependencies first, from the lock (exact versions, verified hashes, wheels only), so a
# code change reuses this layer instead of reinstalling everything.
COPY requirements.lock requirements-build.lock /tmp/
RUN set -e; \
    if [ -n "$EXTRA_CA_PEM" ]; then \
      bundle=/tmp/ca-bundle.pem; \
      cat "$(/opt/venv/bin/python -c 'from pip._vendor import certifi; print(certifi.where())')" > "$bundle"; \
      printf '%s\n' "$EXTRA_CA_PEM" >> "$bundle"; \
      export PIP_CERT="$bundle"; \
    fi; \
    /opt/venv/bin/pip install --require-hashes --only-binary=:all: \
      -r /tmp/requirements.lock -r /tmp/requirements-build.lock
COPY pyproject.toml README.md /src/
COPY app /src/app
# The project itself: no dependencies (all came from the lock), built with the locked
# setuptools (requirements-build.lock), so nothing unlocked is fetched. The build tools
# leave the image with it.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation /src \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE}
# Non-root, with a data directory the user owns (a named volume inherits it).
RUN useradd --system --uid 10001 --user-group --home-dir /srv --no-create-home hydrator \
 && mkdir -p /srv/data \
 && chown hydrator:hydrator /srv/data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DATABASE_URL=sqlite:////srv/data/hydrator.db
WORKDIR /srv
USER hydrator
VOLUME ["/srv/data"]
EXPOSE 8000
# Liveness on the port the server really listens on: `healthcheck` reads the serving
# process's own command line (so `serve --port 9000` is checked on 9000).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["clopos-hydrator", "healthcheck"]
# The service runs as PID 1 and exits 143 after SIGTERM by itself (app/termination.py): the
# kernel ignores a re-raised signal in PID 1, so it exits with the status explicitly.
# Keep the orchestrator's grace period above SHUTDOWN_GRACE_SECONDS + 5 s (default 25 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["clopos-hydrator"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
