#!/bin/sh
# cacheproxy container entrypoint.
#   config:  $CACHEPROXY_CONFIG (default /etc/cacheproxy/config.yaml; mount it from a ConfigMap/volume)
#   network: loopback only (the app shares the pod's/task's network namespace), unless
#            CACHEPROXY_PUBLIC=1 (client and admin ports on 0.0.0.0) or CACHEPROXY_ADMIN_PUBLIC=1
#            (only the admin port, so kubelet probes can reach /readyz on the pod IP)
#   reload:  `kill -HUP 1` (or `docker kill -s HUP <container>`) re-reads the config
set -eu
CONFIG="${CACHEPROXY_CONFIG:-/etc/cacheproxy/config.yaml}"
if [ "${CACHEPROXY_PUBLIC:-0}" = 1 ]; then
    export CACHEPROXY_LISTEN__HOST="${CACHEPROXY_LISTEN__HOST:-0.0.0.0}"
    export CACHEPROXY_ADMIN__HOST="${CACHEPROXY_ADMIN__HOST:-0.0.0.0}"
elif [ "${CACHEPROXY_ADMIN_PUBLIC:-0}" = 1 ]; then
    export CACHEPROXY_ADMIN__HOST="${CACHEPROXY_ADMIN__HOST:-0.0.0.0}"
fi
if [ ! -r "$CONFIG" ]; then
    echo "cacheproxy: no readable config at $CONFIG; mount one there or set CACHEPROXY_CONFIG" >&2
    exit 2
fi
exec cacheproxy serve --config "$CONFIG" "$@"
