# cacheproxy sidecar image: slim, non-root, config at /etc/cacheproxy/config.yaml.
# Build: docker build -t cacheproxy .   Run: docker run -v $PWD/config/demo.yaml:/etc/cacheproxy/config.yaml cacheproxy
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home cacheproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER cacheproxy
ENV CACHEPROXY_CONFIG=/etc/cacheproxy/config.yaml
# Inside a pod the app reaches the sidecar on localhost; set CACHEPROXY_LISTEN__HOST=0.0.0.0 only
# when other containers must reach it over the pod network.
EXPOSE 6380 9121
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9121/healthz', timeout=2)"
ENTRYPOINT ["cacheproxy", "serve"]
