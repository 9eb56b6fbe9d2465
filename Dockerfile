# cacheproxy sidecar image: multi-stage, slim, non-root, config at /etc/cacheproxy/config.yaml.
#   docker build -t cacheproxy .
#   docker run --network host -v $PWD/config/demo.yaml:/etc/cacheproxy/config.yaml cacheproxy
# Loopback only by default (a sidecar shares its app's network namespace); CACHEPROXY_PUBLIC=1 binds
# 0.0.0.0, CACHEPROXY_ADMIN_PUBLIC=1 only the admin port (for kubelet probes). See docker/entrypoint.sh.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml requirements.lock README.md CHANGELOG.md ./
COPY proxy ./proxy
# The dependencies at the versions pinned in requirements.lock (the test tools in it are not needed).
RUN pip wheel --no-cache-dir --constraint requirements.lock --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home cacheproxy \
    && mkdir -p /etc/cacheproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY docker/entrypoint.sh /usr/local/bin/cacheproxy-entrypoint
COPY config/example.yaml /etc/cacheproxy/example.yaml
USER 10001
ENV CACHEPROXY_CONFIG=/etc/cacheproxy/config.yaml \
    PYTHONUNBUFFERED=1
EXPOSE 6380 9121
# The admin port: CACHEPROXY_ADMIN__PORT if set (set it there, not in the file, when changing it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CACHEPROXY_ADMIN__PORT', '9121'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["cacheproxy-entrypoint"]
