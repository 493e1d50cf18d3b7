# One image for the three gRPC services and the docs/local gateway; the command picks the process:
#   python -m services.domain | python -m services.smtp | python -m services.mail | python -m gateway
# No secret is baked in: JWT_SECRET, AZORA_SERVICE_TOKEN_SECRET, AZORA_SECRETS_KEY and MONGODB_URI
# come from the environment at run time (production refuses to start without them). Runs as an
# unprivileged user and works with a read-only root filesystem (writes nothing but /tmp).
#
#   docker build -t azora-email-hosting:local .

# Swagger UI assets for /api-docs: the npm package swagger-ui-dist at the version of
# package-lock.json (the gateway serves them from node_modules/swagger-ui-dist). Install scripts
# are skipped. `npm ci` refuses a lock without other platforms' optional packages (buf's), hence
# the `npm install --no-save` fallback, as in the Makefile.
FROM node:22-bookworm-slim AS assets
WORKDIR /src
COPY package.json package-lock.json ./
RUN (npm ci --ignore-scripts --no-audit --no-fund \
     || npm install --ignore-scripts --no-audit --no-fund --no-save) \
    && test -f node_modules/swagger-ui-dist/swagger-ui-bundle.js

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first (cached until the lock file changes), at the exact versions of the lock file.
COPY requirements/lock.txt requirements/lock.txt
RUN /opt/venv/bin/pip install -c requirements/lock.txt pip setuptools
COPY pyproject.toml ./
COPY services/ services/
COPY gen/ gen/
# PIP_CONSTRAINT also pins the build backend in pip's isolated build environment.
RUN PIP_CONSTRAINT=requirements/lock.txt /opt/venv/bin/pip install -c requirements/lock.txt .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AZORA_ENV=production \
    AZORA_HOST=0.0.0.0
RUN groupadd --system --gid 10001 azora \
    && useradd --system --uid 10001 --gid azora --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin azora
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The services run from site-packages (installed above). The gateway package and gen/ (descriptor
# set and OpenAPI document, read by the gateway; azora.binpb is also what Kubernetes' Envoy init
# container copies out, so Envoy always transcodes with the protos of the deployed services).
COPY gateway/ gateway/
COPY gen/ gen/
COPY --from=assets /src/node_modules/swagger-ui-dist/ node_modules/swagger-ui-dist/
USER 10001:10001
EXPOSE 50051 50052 50053 50054 2587 2465 8080
# Each service's health is probed over gRPC by compose / Kubernetes (per service name and port).
CMD ["python", "-m", "services.domain"]
