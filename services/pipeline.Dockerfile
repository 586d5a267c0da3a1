# The submitter's and the poller's image: one file, SERVICE (required) picks which. The build
# context is the REPOSITORY ROOT, because the image needs libs/common too:
#   docker build -f services/pipeline.Dockerfile --build-arg SERVICE=submitter -t registration-bridge/submitter .
#   docker build -f services/pipeline.Dockerfile --build-arg SERVICE=poller    -t registration-bridge/poller .
# (docker-compose.yml does the same: context ".", this dockerfile, args SERVICE).
# What the context sends is listed in pipeline.Dockerfile.dockerignore beside this file (BuildKit
# reads <Dockerfile>.dockerignore before the context's own .dockerignore).
# legacy-sim is self-contained and keeps its own Dockerfile.
#
# Every third-party package comes from the service's lock, requirements/${SERVICE}.txt, checked
# against its hashes; the local packages follow with --no-deps. The base image is pinned by digest:
# scripts/pin-base-images.sh moves the pins, `make lock` the locks (docs/builds.md).

# submitter or poller: the name of the package under services/, of its entry point, and of the
# stage below that the runtime image starts from.
ARG SERVICE

# ---- what differs between the services: default HTTP_PORT (/healthz, /readyz, /metrics) and the
# entry point. Exec form: the service is PID 1 and gets SIGTERM itself, which it handles (finish
# or hand back the work in hand, then exit 0 within SHUTDOWN_TIMEOUT_S; give it a stop grace
# period beyond that).
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS submitter
ENV HTTP_PORT=8081
EXPOSE 8081
CMD ["submitter"]

FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS poller
ENV HTTP_PORT=8082
EXPOSE 8082
CMD ["poller"]

# ---- build: a virtualenv with libs/common and the service, no build tools left behind --------
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS build
ARG SERVICE

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY requirements/${SERVICE}.txt ./requirements/
RUN pip install --require-hashes -r requirements/${SERVICE}.txt
COPY libs/common ./libs/common
COPY services/${SERVICE} ./services/${SERVICE}
COPY tools/registrations ./tools/registrations
# Not editable: the packages are copied into the venv. --no-deps: the lock above has installed every
# dependency, so nothing is looked up on an index here; --no-build-isolation: the build backend is
# the locked setuptools too. The submitter's image also gets the operator command, `registrations`,
# which runs with the submitter's environment (docs/operations.md); the poller's does not.
RUN pip install --no-deps --no-build-isolation ./libs/common "./services/${SERVICE}" \
    && if [ "${SERVICE}" = submitter ]; then pip install --no-deps --no-build-isolation ./tools/registrations; fi \
    && pip check

# ---- runtime: the service's stage above (the pinned base image, its port and entry point) ------
FROM ${SERVICE}
ARG SERVICE
# The commit built, e.g. --build-arg REVISION="$(git rev-parse --short HEAD)": it reaches the
# image's label and the services' *_build_info{revision}, so that a rollout between two commits
# of one version shows on the dashboard.
ARG REVISION=unknown
LABEL org.opencontainers.image.revision="${REVISION}"

# HTTP_HOST: in a container the probes and Prometheus come from outside it, so every interface;
# the services' own default, 127.0.0.1, is for a run by hand.
# GLIBC_TUNABLES: no per-thread cache of freed blocks in malloc (tcache). Each of the dozens of
# worker threads would otherwise park blocks of every size it ever freed, counted as in use, and
# the RSS would creep up for hours; without it the RSS is flat once warm, at no measured cost in
# speed: the interpreter's lock already serialises most allocation (docs/design.md, Memory).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    REGBRIDGE_REVISION="${REVISION}" \
    HTTP_HOST=0.0.0.0 \
    GLIBC_TUNABLES=glibc.malloc.tcache_count=0

COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin "${SERVICE}"

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# HTTP_HOST:HTTP_PORT serves /healthz, /readyz and /metrics. Every other setting comes from the environment
# (see docs/configuration.md).

# Liveness only: /healthz does not depend on the broker or MongoDB (/readyz does). HTTP_PORT is
# always set: by the service's stage, or by whoever overrides it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['HTTP_PORT'] + '/healthz', timeout=2)"]
