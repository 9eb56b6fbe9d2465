"""Packaging as far as it can be tested without a Docker engine: the image's entrypoint script run
directly (config path overridden), its HEALTHCHECK command, the Dockerfile's instructions and a
hadolint run, shellcheck of the shell scripts, the deploy manifests checked against the proxy's own
config loader and admin endpoints, `pip install .` into a fresh venv, and the version.
(The demo has its own test: test_demo.py.)

Not tested here: `docker build`/`docker run` themselves, the manifests on a real cluster, compose up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request

import pytest
import yaml

from proxy import __version__
from proxy.config import config_from_dict
from tests.fixtures.helpers import REPO, wait_for
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import RawClient

pytestmark = pytest.mark.proxy_only

VENV_BIN = REPO / ".venv" / "bin"
DOCKERFILE = (REPO / "Dockerfile").read_text()
FINAL_STAGE = DOCKERFILE[DOCKERFILE.rindex("\nFROM "):]


def entrypoint(env: dict, config) -> subprocess.Popen:
    full = {"PATH": f"{VENV_BIN}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
            "CACHEPROXY_CONFIG": str(config), **env}
    return subprocess.Popen(["sh", str(REPO / "docker" / "entrypoint.sh")], env=full, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD (exec form); it reads the port from CACHEPROXY_ADMIN__PORT."""
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", FINAL_STAGE, re.M | re.S)
    assert match, "no HEALTHCHECK ... CMD [...] in the final stage"
    return json.loads(match.group(1).replace("\\\n", ""))


def healthcheck(admin_port: int) -> subprocess.CompletedProcess:
    argv = healthcheck_command()
    assert argv[0] == "python"                   # the image's python; here, the one running the tests
    env = {"PATH": "/usr/bin:/bin", "CACHEPROXY_ADMIN__PORT": str(admin_port)}
    return subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=10, env=env)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["default", "public", "admin-public"])
def test_entrypoint_serves_the_mounted_config(tmp_path, redis_server, mode):
    port, admin = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"listen": {"port": port}, "admin": {"port": admin},
                                      "upstream": {"url": redis_server.url}}))
    env = {"public": {"CACHEPROXY_PUBLIC": "1"}, "admin-public": {"CACHEPROXY_ADMIN_PUBLIC": "1"}}.get(mode, {})
    proc = entrypoint(env, config)
    try:
        def answers():
            try:
                with RawClient("127.0.0.1", port, timeout=1) as c:
                    return c.cmd("PING").value == "PONG"
            except OSError:
                return False
        wait_for(answers, timeout=20, what="the proxy started by the entrypoint")
        for path in ("/healthz", "/readyz"):      # what the probes and the HEALTHCHECK ask
            assert urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5).status == 200
        check = healthcheck(admin)
        assert check.returncode == 0, check.stderr
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    listen = "0.0.0.0" if mode == "public" else "127.0.0.1"
    admin_host = "127.0.0.1" if mode == "default" else "0.0.0.0"
    assert f"listening on {listen}:{port}" in out
    assert f"admin on http://{admin_host}:{admin}" in out
    # With the proxy gone the HEALTHCHECK fails, as Docker needs it to.
    assert healthcheck(admin).returncode != 0


def test_entrypoint_without_a_config_says_where_it_looked(tmp_path):
    proc = entrypoint({}, tmp_path / "missing.yaml")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert f"no readable config at {tmp_path / 'missing.yaml'}" in out


def test_dockerfile_is_multi_stage_non_root_with_healthcheck():
    instructions = [line.split(None, 1) for line in DOCKERFILE.splitlines() if line and not line.startswith(("#", " "))]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert len(froms) >= 2 and all("slim" in f for f in froms)
    user = re.search(r"^USER (\S+)", FINAL_STAGE, re.M).group(1)
    assert user not in ("root", "0")
    assert "/healthz" in " ".join(healthcheck_command()) and "9121" in " ".join(healthcheck_command())
    assert 'ENTRYPOINT ["cacheproxy-entrypoint"]' in FINAL_STAGE
    assert "COPY docker/entrypoint.sh /usr/local/bin/cacheproxy-entrypoint" in FINAL_STAGE
    assert "CACHEPROXY_CONFIG=/etc/cacheproxy/config.yaml" in FINAL_STAGE
    assert "CACHEPROXY_LISTEN__HOST" not in DOCKERFILE, "0.0.0.0 only when asked (entrypoint)"
    for path in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.M):
        for item in path.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is missing"


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' brings it)")
    return found


def test_dockerfile_passes_hadolint():
    out = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shell_scripts_pass_shellcheck():
    out = subprocess.run([_tool("shellcheck"), "docker/entrypoint.sh", "demo.sh"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kubernetes_sidecar_probes_and_config():
    docs = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "sidecar.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = config_from_dict(yaml.safe_load(config_map["data"]["config.yaml"]), "sidecar.yaml ConfigMap",
                           env={"REDIS_URL": "redis://cache:6379/0", "PGDSN": "postgresql://u@db/app"})
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "cacheproxy")
    app = next(c for c in pod["containers"] if c["name"] != "cacheproxy")
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": cfg.admin.port}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": cfg.admin.port}
    assert {"containerPort": cfg.admin.port, "name": "admin"} in sidecar["ports"]
    assert f"127.0.0.1:{cfg.listen.port}" in json.dumps(app["env"]), "the app talks to the sidecar on loopback"
    assert cfg.listen.host == "127.0.0.1" and cfg.routes[0].write.mode == "write-behind"
    # The ConfigMap lands where the image looks for its config.
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "config")
    assert os.path.join(mount["mountPath"], "config.yaml") == "/etc/cacheproxy/config.yaml"
    assert next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"] == \
        config_map["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env.get("CACHEPROXY_ADMIN_PUBLIC") == "1", "kubelet probes reach the admin port on the pod IP"
    assert pod["terminationGracePeriodSeconds"] > cfg.shutdown.grace_seconds


def test_compose_file_wires_the_services():
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "dynamodb", "cacheproxy"} <= set(services)
    assert services["dynamodb"]["image"].startswith("amazon/dynamodb-local")
    proxy = services["cacheproxy"]
    assert (REPO / "deploy" / proxy["build"] / "Dockerfile").exists()
    source, target = proxy["volumes"][0].split(":")[:2]
    assert target == "/etc/cacheproxy/config.yaml"
    env = {k: str(v) for k, v in proxy["environment"].items()}
    cfg = config_from_dict(yaml.safe_load((REPO / "deploy" / source).read_text()), source, env=env)
    assert cfg.upstream.host == "redis" and cfg.backends["main"].dsn.startswith("postgresql://postgres@postgres")
    assert f"127.0.0.1:{cfg.admin.port}:{cfg.admin.port}" in proxy["ports"]


@pytest.mark.timeout(240)
def test_pip_install_gives_a_working_command(tmp_path):
    """`pip install .` into a fresh venv (dependencies borrowed from .venv to stay offline-fast)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "proxy", src / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip costs seconds): .venv's pip installs into it (pip --python).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    with open(os.path.join(site, "zz-cacheproxy-deps.pth"), "w") as f:     # .venv's packages, after its own
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
                          "--no-deps", str(src)], capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stdout + out.stderr
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run([venv / "bin" / "cacheproxy", "--version"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=30, env=env)
    assert version.stdout.strip() == f"cacheproxy {__version__}", version.stderr
    where = subprocess.run([venv / "bin" / "python", "-c",
                            "import proxy, proxy.backends.postgres, proxy.backends.dynamodb, proxy.ops.logs; "
                            "print(proxy.__file__)"], cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    check = subprocess.run([venv / "bin" / "cacheproxy", "check-config", str(REPO / "config" / "example.yaml")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=30, env=env)
    assert check.returncode == 0 and ": OK (" in check.stdout, check.stderr


def test_version_matches_pyproject_and_changelog():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    out = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == f"cacheproxy {__version__}"
    assert f"## {__version__}" in (REPO / "CHANGELOG.md").read_text()
    assert project["scripts"]["cacheproxy"] == "proxy.__main__:main"
