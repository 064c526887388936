# The tokenfuse processor (the ext_proc service Envoy consults); Envoy runs from its own
# official image next to it (docker-compose.yml, deploy/kubernetes/). No secret is baked in:
# TOKENFUSE_SECRET(_FILE), REDIS_URL and the pool files come at run time.
#   docker build -t tokenfuse:0.1.0 .
# tests/test_install.py builds the wheel from exactly what the build stage COPYs and runs
# the ENTRYPOINT below from a non-editable install of it.

# Build: a wheel from the checkout (the Lua scripts and prices.json are its package data).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py ./
COPY service ./service
COPY lua ./lua
COPY protos ./protos
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Runtime: the wheel installed (not editable), a non-root user, writable state only where
# mounted. The tokenizers and prices are read from the installed package; nothing is
# fetched at run time.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENFUSE_STATE_DIR=/var/lib/tokenfuse \
    TOKENFUSE_POOLS_DIR=/etc/tokenfuse/pools
COPY --from=build /wheels /wheels
# xds-protos (Envoy's protos) overwrites opentelemetry-proto's files with an older copy
# the OTLP exporter cannot load; put them back (as scripts/setup.sh does).
RUN pip install --no-cache-dir /wheels/*.whl \
    && pip install --no-cache-dir --force-reinstall --no-deps "opentelemetry-proto==$(python -c \
       'from importlib.metadata import version; print(version("opentelemetry-proto"))')" \
    && python -c "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin tokenfuse \
    && mkdir -p /var/lib/tokenfuse/envoy /etc/tokenfuse/pools \
    && chown -R tokenfuse:tokenfuse /var/lib/tokenfuse
USER 10001:10001
WORKDIR /var/lib/tokenfuse
# 50051: ext_proc over TCP when TOKENFUSE_PROCESSOR_ADDRESS=0.0.0.0:50051 (unauthenticated:
# publish it to the gateway only); 9464: metrics and health (TOKENFUSE_METRICS_ADDRESS).
EXPOSE 50051 9464
VOLUME ["/var/lib/tokenfuse"]
ENTRYPOINT ["python", "-m", "tokenfuse.server"]
