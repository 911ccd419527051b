"""Settings per service: each service loads its own class, every `QVM_*` variable is defined once, and the
variables, their defaults and the README's table stay what deployments rely on."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from services.attestation_verifier.settings import VerifierSettings
from services.janitor.settings import JanitorSettings
from services.key_broker.settings import KeyBrokerSettings
from services.node_agent.settings import NodeAgentSettings
from services.scheduler.settings import SchedulerSettings
from shared import config
from shared.config import CommonSettings
from shared.identity import SERVICE_ROLES
from shared.models import TrustState
from tests.framework.settings import AllSettings

README = Path(__file__).resolve().parents[2] / "README.md"

SERVICE_SETTINGS: dict[str, type[CommonSettings]] = {
    "scheduler": SchedulerSettings, "janitor": JanitorSettings, "attestation-verifier": VerifierSettings,
    "key-broker": KeyBrokerSettings, "node-agent": NodeAgentSettings,
}

# Every variable deployments set (docker-compose.yml, `qvm up`, deploy files) with its default.
DEFAULTS: dict[str, Any] = {
    "state_dir": Path(".qvm"), "nats_url": None, "pki_dir": None, "stream_replicas": 1,
    "stream_max_age_s": 90 * 86400, "dead_letter_max_age_s": 30 * 86400, "duplicate_window_s": 600,
    "sweep_interval_s": 2.0, "max_inflight": 128, "attest_policy": None, "measurement_pcr": 15, "tpm": None,
    "node_id": None, "images_dir": None, "heartbeat_interval_s": 5.0, "agent_sweep_interval_s": 60.0,
    "publisher_keys": [], "vmm": "qemu-microvm", "vm_accel": "auto", "vm_cgroups": True, "vm_seccomp": True,
    "egress_netns": None, "vm_network": "netns", "instances_dir": None, "tpm_ak_algorithm": "ecc-p256",
    "measurement_log": None, "attest_interval_s": 60.0, "attest_jitter_s": 10.0, "attest_timeout_s": 30.0,
    "key_release_timeout_s": 30.0, "client_secrets_timeout_s": 300.0, "kek_source": "",
    "kek_passphrase_file": None, "deadline_pending_s": 3600, "deadline_placed_s": 60,
    "deadline_provisioning_s": 900, "deadline_run_grace_s": 300, "deadline_teardown_s": 300,
    "min_trust": TrustState.TRUSTED, "offline_after_s": 20.0, "node_doctor": "warn",
    "gpu_cc": {"require_cc": False, "allow_rim_unavailable": False, "rim_cache_dir": None}, "guard": "auto",
    "warm_pool": (),
}


def _classes() -> list[type[BaseSettings]]:
    shared = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, CommonSettings)]
    return [*shared, *SERVICE_SETTINGS.values()]


def test_variables_and_defaults_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DEFAULTS:
        monkeypatch.delenv(f"QVM_{name.upper()}", raising=False)
    assert AllSettings().model_dump() == DEFAULTS
    for cls in _classes():
        assert cls.model_config["env_prefix"] == "QVM_" and cls.model_config["extra"] == "ignore"


def test_each_variable_is_defined_once() -> None:
    owner: dict[str, str] = {}
    for cls in _classes():
        for field in vars(cls).get("__annotations__", {}):
            if field in cls.model_fields:
                assert field not in owner, f"{field} defined in {owner[field]} and {cls.__name__}"
                owner[field] = cls.__name__
    assert set(owner) == set(DEFAULTS)


@pytest.mark.parametrize("role", [r.value for r in SERVICE_ROLES])
def test_each_service_loads_its_own_settings(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[type[Any]] = []
    monkeypatch.setattr("shared.runtime.serve", lambda name, settings_type, *_: loaded.append(settings_type))
    runpy.run_module(f"services.{role.replace('-', '_')}", run_name="__main__")
    assert loaded == [SERVICE_SETTINGS[role]]


def test_a_service_gets_a_variable_only_it_or_shared_code_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVM_MIN_TRUST", "unverified")
    monkeypatch.setenv("QVM_MAX_INFLIGHT", "7")
    assert SchedulerSettings().min_trust is TrustState.UNVERIFIED and SchedulerSettings().max_inflight == 7
    assert KeyBrokerSettings().max_inflight == 7
    assert "min_trust" not in KeyBrokerSettings.model_fields and "max_inflight" not in JanitorSettings.model_fields


def _readme_rows() -> dict[str, set[str]]:
    section = README.read_text().split("## Configuration", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) >= 3 and (m := re.fullmatch(r"`(\w+)`", cells[1])):
            rows[m.group(1)] = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", line))
    return rows


@pytest.mark.parametrize("cls", [CommonSettings, *SERVICE_SETTINGS.values()], ids=lambda c: c.__name__)
def test_readme_lists_each_service_s_variables(cls: type[CommonSettings]) -> None:
    rows = _readme_rows()
    assert cls.__name__ in rows, f"README's configuration table has no row for {cls.__name__}"
    own = set(cls.model_fields) - (set() if cls is CommonSettings else set(CommonSettings.model_fields))
    listed = {v.lower() for v in rows[cls.__name__]} & set(DEFAULTS)
    assert listed == own, f"README lists {sorted(listed)} for {cls.__name__}, which reads {sorted(own)}"
