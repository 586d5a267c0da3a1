# The submitter's and the poller's image: one file, SERVICE (required) picks which. The build
# context is the REPOSITORY ROOT, because the image needs libs/common too:
#   docker build -f services/pipeline.Dockerfile --build-arg SERVICE=submitter -t registration-bridge/submitter .
#   docker build -f services/pipeline.Dockerfile --build-arg SERVICE=poller    -t registration-bridge/poller .
# (docker-compose.yml does the same: context ".", this dockerfile, args SERVICE).
# What the context sends is listed in pipeline.Dockerfile.dockerignore beside this file (BuildKit
# reads <Dockerfile>.dockerignore before the context's own .dockerignore).
# legacy-sim is self-contained and keeps its own Dockerfile.

# submitter or poller: the name of the package under services/, of its entry point, and of the
# stage below that the runtime image starts from.
ARG SERVICE

# ---- what differs between the services: default HTTP_PORT (/healthz, /readyz, /metrics) and the
# entry point. Exec form: the service is PID 1 and gets SIGTERM itself, which it handles (finish
# or hand back the work in hand, then exit 0 within SHUTDOWN_TIMEOUT_S; give it a stop grace
# period beyond that).
FROM python:3.11-slim AS submitter
ENV HTTP_PORT=8081
EXPOSE 8081
CMD ["submitter"]

FROM python:3.11-slim AS poller
ENV HTTP_PORT=8082
EXPOSE 8082
CMD ["poller"]

# ---- build: a virtualenv with libs/common and the service, no build tools left behind --------
FROM python:3.11-slim AS build
ARG SERVICE

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY libs/common ./libs/common
COPY services/${SERVICE} ./services/${SERVICE}
# Not editable: the package is copied into the venv. The dependency on regbridge-common is met by
# the local libs/common named in the same command, never looked up on PyPI.
RUN pip install ./libs/common ./services/${SERVICE}

# ---- runtime: the service's stage above (python:3.11-slim with its port and entry point) -------
FROM ${SERVICE}
ARG SERVICE

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin "${SERVICE}"

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# HTTP_PORT serves /healthz, /readyz and /metrics. Every other setting comes from the environment
# (see docs/configuration.md).

# Liveness only: /healthz does not depend on the broker or MongoDB (/readyz does). HTTP_PORT is
# always set: by the service's stage, or by whoever overrides it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['HTTP_PORT'] + '/healthz', timeout=2)"]
