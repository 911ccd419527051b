"""Structural checks of the deployment files (no Docker engine needed).

docker-compose.yml must run every service role from the one Dockerfile, each image with its own pyproject
extra (build arg QVM_EXTRAS), and reference only files that exist; the NATS configs under deploy/nats must
be accepted by the real `nats-server -t` once their /etc/qvm/pki paths point at a freshly generated PKI and
an `authorization.conf` generated from the catalogue's permissions sits next to them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.errors import ConfigError
from shared.identity import SERVICE_ROLES, Identity, Role
from shared.natsconf import authorization_block
from shared.natsserver import nats_server_binary
from shared.pki import Pki
from tests.framework.extras import distributions, extras

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
NATS_DIR = ROOT / "deploy" / "nats"
NATS_CONFIGS = ("nats.conf", "cluster/node-1.conf", "cluster/node-2.conf", "cluster/node-3.conf")
PKI_MOUNT = "/etc/qvm/pki"
STORE_DIR = "/data/jetstream"
SERVICE_MODULE = re.compile(r"^services\.([a-z_]+)$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE.is_file(), "docker-compose.yml is missing"
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _depends_on(svc: dict[str, Any]) -> set[str]:
    dep = svc.get("depends_on", [])
    return set(dep) if isinstance(dep, list | dict) else set()


# ---------------------------------------------------------------- compose and Dockerfile


def test_dockerfile_exists() -> None:
    assert DOCKERFILE.is_file()
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["python", "-m"\]', text, re.M)
    for copied in re.findall(r"^COPY\s+(\S+)", text, re.M):
        assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which does not exist"


def test_every_service_role_has_a_compose_service(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for role in SERVICE_ROLES:
        assert role.value in services, f"no compose service for {role.value}"
        svc = services[role.value]
        assert _command(svc) == [f"services.{role.value.replace('-', '_')}"]
        assert svc.get("build"), f"{role.value} is not built from the Dockerfile"
        env = svc.get("environment", {})
        # one server by default; docker-compose.cluster.yml's users set every member's URL
        assert env.get("QVM_NATS_URL") == "${QVM_NATS_URL:-tls://nats:4222}"
        assert env.get("QVM_PKI_DIR") == PKI_MOUNT
        assert "nats" in _depends_on(svc)


def _extras_of(svc: dict[str, Any]) -> set[str]:
    return {e.strip() for e in str(svc["build"].get("args", {}).get("QVM_EXTRAS", "all")).split(",")}


def test_services_build_from_one_dockerfile(compose: dict[str, Any]) -> None:
    builds = {json.dumps({k: v for k, v in s["build"].items() if k != "args"}, sort_keys=True)
              for s in _services(compose).values() if "build" in s}
    assert len(builds) == 1, f"services are built from different Dockerfiles: {builds}"
    by_image: dict[str, set[str]] = {}
    for svc in _services(compose).values():
        if "build" in svc:
            by_image.setdefault(svc["image"], set()).add(json.dumps(svc["build"], sort_keys=True))
    assert all(len(b) == 1 for b in by_image.values()), f"one image tag built in two ways: {by_image}"


def test_each_image_installs_its_own_extra(compose: dict[str, Any]) -> None:
    """A service's image installs its role's extra (and only the CLI's besides); the one-shot jobs the CLI's."""
    services = _services(compose)
    known = set(extras())
    for role in SERVICE_ROLES:
        got = _extras_of(services[role.value])
        assert role.value in got and got <= {role.value, "cli"}, f"{role.value} installs qvm[{','.join(got)}]"
    for name in ("pki", "provision"):
        assert _extras_of(services[name]) == {"cli"}
    for name, svc in services.items():
        if "build" in svc:
            assert _extras_of(svc) <= known, f"{name}: unknown extra in {_extras_of(svc)}"
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG QVM_EXTRAS=all$", text, re.M)
    assert re.search(r'^RUN pip install "\.\[\$\{QVM_EXTRAS\}\]"', text, re.M)


def test_dockerfile_installs_the_tss_for_the_extras_that_need_it() -> None:
    """tpm2-pytss builds against libtss2-dev: the Dockerfile installs it for exactly the extras that pull it in."""
    m = re.search(r'case ",\$\{QVM_EXTRAS\}," in\s*\\?\s*(\S+)\)', DOCKERFILE.read_text())
    assert m, "the Dockerfile no longer chooses the TSS packages by QVM_EXTRAS"
    chosen = {p.strip("*,") for p in m.group(1).split("|")}
    needing = {e for e in extras() if e != "dev" and "tpm2-pytss" in distributions(e)}
    assert chosen == needing


def test_nats_service(compose: dict[str, Any]) -> None:
    nats = _services(compose)["nats"]
    assert str(nats["image"]).startswith("nats:2.10")
    assert _command(nats) == ["-c", "/etc/nats/nats.conf"]
    assert "./deploy/nats:/etc/nats:ro" in nats["volumes"]
    assert any(str(v).startswith(f"pki:{PKI_MOUNT}") for v in nats["volumes"])


def test_node_agent_gets_kvm_and_tpm(compose: dict[str, Any]) -> None:
    agent = _services(compose)["node-agent"]
    assert agent.get("privileged") is True
    devices = {str(d).split(":")[0] for d in agent.get("devices", [])}
    assert {"/dev/kvm", "/dev/tpmrm0"} <= devices
    others = [n for n, s in _services(compose).items() if n != "node-agent" and (s.get("privileged") or
                                                                               s.get("devices"))]
    assert not others, f"only the node-agent may be privileged: {others}"


def test_one_shot_pki_and_provision(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, argv in (("pki", ["pki", "init"]), ("provision", ["provision"])):
        svc = services[name]
        entry = svc.get("entrypoint")
        full = ([entry] if isinstance(entry, str) else list(entry or [])) + _command(svc)
        assert full == ["qvm", *argv], f"{name} runs {full}"
        assert svc.get("restart", "no") == "no"
    assert f"pki:{PKI_MOUNT}" in services["pki"]["volumes"], "pki must write the pki volume"


def test_service_modules_exist(compose: dict[str, Any]) -> None:
    modules = [m.group(1) for s in _services(compose).values() for a in _command(s) if (m := SERVICE_MODULE.match(a))]
    assert sorted(modules) == sorted(r.value.replace("-", "_") for r in SERVICE_ROLES)
    for pkg in modules:
        main = ROOT / "services" / pkg / "__main__.py"
        assert main.is_file(), f"docker-compose runs `python -m services.{pkg}`, but {main} does not exist"


def test_volumes_and_build_contexts_exist(compose: dict[str, Any]) -> None:
    named = set((compose.get("volumes") or {}).keys())
    for name, svc in _services(compose).items():
        build = svc.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            assert (ROOT / context).is_dir(), f"{name}: build context {context} missing"
            if isinstance(build, dict) and "dockerfile" in build:
                assert (ROOT / context / build["dockerfile"]).is_file()
        for vol in svc.get("volumes", []):
            source = vol.get("source", "") if isinstance(vol, dict) else str(vol).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: volume source {source} does not exist"
            else:
                assert source in named, f"{name}: named volume {source} is not declared"
        for dep in _depends_on(svc):
            assert dep in _services(compose), f"{name} depends on unknown service {dep}"


# ---------------------------------------------------------------- NATS configs


def test_nats_configs_exist() -> None:
    for rel in NATS_CONFIGS:
        assert (NATS_DIR / rel).is_file(), f"deploy/nats/{rel} is missing"
    assert (NATS_DIR / "README.md").is_file()


@pytest.mark.parametrize("rel", NATS_CONFIGS)
def test_nats_configs_use_the_mounted_pki(rel: str) -> None:
    text = (NATS_DIR / rel).read_text()
    member = re.search(r'server_name: "(nats-\d)"', text) if rel.startswith("cluster/") else None
    own = f"servers/{member.group(1)}/" if member else ""  # a cluster member's own certificate (routes check names)
    for f in (f"{own}server.pem", f"{own}server-key.pem", "ca.pem"):
        assert f'"{PKI_MOUNT}/{f}"' in text
    assert "verify_and_map: true" in text
    assert f'store_dir: "{STORE_DIR}"' in text
    assert re.search(r"^include \S*authorization\.conf$", text, re.M)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_cluster_routes(n: int) -> None:
    text = (NATS_DIR / "cluster" / f"node-{n}.conf").read_text()
    assert f'server_name: "nats-{n}"' in text
    assert 'name: "qvm"' in text
    routes = set(re.findall(r"nats-route://(nats-\d):6222", text))
    assert routes == {f"nats-{m}" for m in (1, 2, 3) if m != n}


def _authorization_conf(pki: Pki) -> str:
    return authorization_block(pki.identities())  # what `qvm pki nats-config` prints


@pytest.fixture(scope="module")
def nats_test_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/nats copied with its PKI paths pointing at a fresh PKI, plus a generated authorization.conf."""
    base = tmp_path_factory.mktemp("deploy")
    pki = Pki(base / "pki")
    pki.init(nodes=["node-1"])
    for n in (1, 2, 3):
        pki.issue_server(f"nats-{n}")  # what `qvm pki init --nats-servers nats-1,nats-2,nats-3` makes
    assert Identity(Role.NODE_AGENT, "node-1") in pki.identities()
    out = base / "nats"
    shutil.copytree(NATS_DIR, out)
    for rel in NATS_CONFIGS:
        f = out / rel
        text = f.read_text()
        text = text.replace(f"{PKI_MOUNT}/", f"{pki.root}/").replace(STORE_DIR, str(base / "jetstream"))
        f.write_text(text)
    (out / "authorization.conf").write_text(_authorization_conf(pki))
    return out


@pytest.mark.parametrize("rel", NATS_CONFIGS)
def test_nats_server_accepts_config(nats_test_dir: Path, rel: str) -> None:
    try:
        binary = nats_server_binary()
    except ConfigError as exc:
        pytest.skip(f"nats-server binary not available: {exc}")
    proc = subprocess.run(
        [str(binary), "-c", str(nats_test_dir / rel), "-t"], capture_output=True, text=True, timeout=30,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nats-server -t rejected {rel}:\n{output}"
