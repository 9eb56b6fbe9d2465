"""Packaging as far as it can be tested without a Docker engine: the image's entrypoint script run
directly, the Dockerfile's required instructions, the deploy manifests, the version (the demo: test_demo.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from proxy import __version__
from proxy.config import config_from_dict
from tests.fixtures.proxy import RawClient
from tests.fixtures.redis_server import free_port
from tests.integration.test_writebehind_postgres import REPO, wait_for

pytestmark = pytest.mark.proxy_only


def entrypoint(env: dict, config) -> subprocess.Popen:
    full = {"PATH": f"{REPO / '.venv' / 'bin'}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
            "CACHEPROXY_CONFIG": str(config), **env}
    return subprocess.Popen(["sh", str(REPO / "docker" / "entrypoint.sh")], env=full, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("public", [False, True])
def test_entrypoint_serves_the_mounted_config(tmp_path, redis_server, public):
    port, admin = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"listen": {"port": port}, "admin": {"port": admin},
                                      "upstream": {"url": redis_server.url}}))
    proc = entrypoint({"CACHEPROXY_PUBLIC": "1"} if public else {}, config)
    try:
        def answers():
            try:
                with RawClient("127.0.0.1", port, timeout=1) as c:
                    return c.cmd("PING").value == "PONG"
            except OSError:
                return False
        wait_for(answers, timeout=20, what="the proxy started by the entrypoint")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    host = "0.0.0.0" if public else "127.0.0.1"
    assert f"listening on {host}:{port}" in out
    assert f"admin on http://{host}:{admin}" in out


def test_entrypoint_without_a_config_says_where_it_looked(tmp_path):
    proc = entrypoint({}, tmp_path / "missing.yaml")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert f"no readable config at {tmp_path / 'missing.yaml'}" in out


def test_dockerfile_is_multi_stage_non_root_with_healthcheck():
    text = (REPO / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) >= 2 and all("slim" in f for f in froms)
    final = text[text.rindex("\nFROM "):]
    user = re.search(r"^USER (\S+)", final, re.M).group(1)
    assert user not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", final, re.M)
    assert 'ENTRYPOINT ["cacheproxy-entrypoint"]' in final
    assert "COPY docker/entrypoint.sh /usr/local/bin/cacheproxy-entrypoint" in final
    assert "CACHEPROXY_CONFIG=/etc/cacheproxy/config.yaml" in final
    for path in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in path.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is missing"


def test_kubernetes_sidecar_probes_and_config():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "sidecar.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = config_from_dict(yaml.safe_load(config_map["data"]["config.yaml"]), "sidecar.yaml ConfigMap",
                           env={"REDIS_URL": "redis://cache:6379/0", "PGDSN": "postgresql://u@db/app"})
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    sidecar = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "cacheproxy")
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": cfg.admin.port}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": cfg.admin.port}
    assert cfg.listen.host == "127.0.0.1" and cfg.routes[0].write.mode == "write-behind"
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    assert {"redis", "postgres", "dynamodb", "cacheproxy"} <= set(compose["services"])


def test_version_matches_pyproject_and_changelog():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    out = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == f"cacheproxy {__version__}"
    assert f"## {__version__}" in (REPO / "CHANGELOG.md").read_text()
