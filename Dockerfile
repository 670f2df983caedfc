# OAO: one image, two entrypoints (`oao-scheduler`, `oao-worker`), run as a non-root user
# under dumb-init (signals reach the process, so SIGTERM drains a worker).
#
#   docker build -t oao .                              # online, on the official Python image
#   deploy/build-image.sh                              # offline: Debian base, host-built wheels
#   docker run --rm oao oao-scheduler run examples/blog_post.yaml
#   docker run -e OAO_REDIS_URL=redis://redis:6379/0 oao oao-worker --concurrency 20
#
# Your agents: a derived image (`FROM oao` + `COPY agents/ /app/agents/`), or a mounted
# directory with `--app-dir`. Configuration: OAO_* environment variables. See
# docs/deployment.md.

# Any Debian-like image with Python 3.11+ at `python3` (and its venv module).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# "--no-index" installs only from deploy/wheelhouse/ (filled by deploy/build-image.sh).
ARG PIP_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY deploy/wheelhouse/ /wheels/
COPY pyproject.toml README.md /src/
COPY oao /src/oao
COPY oao_common /src/oao_common
COPY oao_scheduler /src/oao_scheduler
COPY oao_worker /src/oao_worker
# async-timeout: redis-py needs it on Python < 3.11.3 (Debian bookworm has 3.11.2).
RUN python3 -m venv /opt/oao \
 && /opt/oao/bin/pip install ${PIP_ARGS} --find-links /wheels \
      /src 'dumb-init>=1.2.5' 'async-timeout>=4.0.3; python_full_version < "3.11.3"' \
 && { /opt/oao/bin/pip uninstall -y -q setuptools wheel 2>/dev/null || true; } \
 && /opt/oao/bin/oao-scheduler --help >/dev/null \
 && /opt/oao/bin/oao-worker --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="oao" \
      org.opencontainers.image.description="Open Agent Orchestrator: oao-scheduler and oao-worker" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/oao /opt/oao
# A fixed numeric user (Kubernetes' runAsNonRoot checks the number); /app is its home.
RUN echo 'oao:x:10001:10001:oao:/app:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'oao:x:10001:' >> /etc/group \
 && mkdir -p /app \
 && chown 10001:10001 /app
COPY --chown=10001:10001 examples /app/examples
WORKDIR /app
USER 10001:10001
ENV PATH=/opt/oao/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app
ENTRYPOINT ["dumb-init", "--"]
CMD ["oao-worker"]
