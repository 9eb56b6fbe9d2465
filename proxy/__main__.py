"""Command line: `cacheproxy serve | check-config | version`. Wiring only; the work lives elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

from . import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheproxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cacheproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", default=os.environ.get("CACHEPROXY_CONFIG"),
                       help="config file (default: $CACHEPROXY_CONFIG, else built-in defaults)")
    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the listening port (SO_REUSEPORT)")
    serve.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    serve.add_argument("--pid-file", help="write the process id here (for `cacheproxy reload`)")
    reload = sub.add_parser("reload", help="make a running proxy re-read its config file (SIGHUP)")
    reload.add_argument("--pid-file", required=True, help="the --pid-file the proxy was started with")
    stats = sub.add_parser("stats", help="print a summary of a running proxy's metrics")
    stats.add_argument("--admin", default="http://127.0.0.1:9121", help="the proxy's admin URL")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", default=os.environ.get("CACHEPROXY_CONFIG"))
    sub.add_parser("version", help="print the version")
    from .writebehind.dlq import add_parser as add_dlq_parser
    add_dlq_parser(sub)
    return parser


def _load(path: str | None):
    from .config import ConfigError, config_from_dict, load_config
    try:
        return load_config(path) if path else config_from_dict({}, "<defaults>", env=os.environ)
    except ConfigError as exc:
        print(f"cacheproxy: invalid configuration:\n{exc}", file=sys.stderr)
        sys.exit(2)


def check_config(path: str | None) -> int:
    if not path:
        print("cacheproxy check-config: give a config file (or set CACHEPROXY_CONFIG)", file=sys.stderr)
        return 2
    cfg = _load(path)
    print(f"{path}: OK ({len(cfg.routes)} routes, {len(cfg.backends)} backends, "
          f"upstream {cfg.upstream.redacted_url})")
    return 0


def send_reload(pid_file: str) -> int:
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"cacheproxy reload: cannot signal the proxy from {pid_file}: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}; the proxy logs whether the new config was applied or refused")
    return 0


def serve(args) -> int:
    # Until the event loop installs its handlers, a SIGTERM means "exit cleanly", not "die".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    cfg = _load(args.config)
    from .ops.logs import configure as configure_logging
    configure_logging(cfg)
    if args.workers > 1:
        if args.pid_file:       # the supervisor's pid: it forwards SIGHUP to every worker
            with open(args.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        return _supervise(args)
    if not args.no_uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            logging.getLogger("cacheproxy").info("uvloop not installed; using asyncio's event loop")
    from .config import StartupError
    from .server import ProxyServer
    try:
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        asyncio.run(ProxyServer(cfg, config_path=args.config).run())
    except OSError as exc:   # e.g. the port is taken: say so plainly
        logging.getLogger("cacheproxy").error("cannot serve: %s", exc)
        return 1
    except StartupError as exc:
        logging.getLogger("cacheproxy").error("cannot start: %s", exc)
        return 2
    return 0


def _supervise(args) -> int:
    """Run N single-process workers that share the port through SO_REUSEPORT; forward signals."""
    env = dict(os.environ, CACHEPROXY_LISTEN__REUSE_PORT="true")
    cmd = [sys.executable, "-m", "proxy", "serve", "--workers", "1"]
    if args.config:
        cmd += ["--config", args.config]
    if args.no_uvloop:
        cmd.append("--no-uvloop")
    # CACHEPROXY_WORKER keeps each worker's write-behind consumer name stable across restarts.
    children = [subprocess.Popen(cmd, env=dict(env, CACHEPROXY_WORKER=str(i))) for i in range(args.workers)]

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    while any(child.poll() is None for child in children):
        time.sleep(0.2)
    return max((child.returncode for child in children), key=abs, default=0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"cacheproxy {__version__}")
        return 0
    if args.command == "reload":
        return send_reload(args.pid_file)
    if args.command == "stats":
        from .ops.stats import print_stats
        return print_stats(args.admin)
    if args.command == "dlq":
        from .writebehind.dlq import run as run_dlq
        return run_dlq(args, os.environ.get("CACHEPROXY_CONFIG"))
    if args.command == "check-config":
        return check_config(args.file)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
