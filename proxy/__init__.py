"""cacheproxy: a caching sidecar that speaks the Redis protocol."""

__version__ = "0.2.0"
