"""The runtime guard in the measured launch: the agent's log entry names the guard it loaded, and a policy that
requires the guard trusts neither a node running without it (or with other rules), nor an instance launched
while none was loaded."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from shared.tpm.measurements import AgentMeasurement, InstanceMeasurement, replay
from shared.tpm.policy import AttestationPolicy, ImageReference, appraise
from shared.tpm.quote import QuoteError

GUARD = "9a" * 32
AGENT = "ab" * 32


def _agent(guard: str) -> AgentMeasurement:
    return AgentMeasurement(node_id="n", agent_version="1", agent_sha256=AGENT, config_sha256="cd" * 32,
                            guard_sha256=guard)


def _instance(instance_id: str) -> InstanceMeasurement:
    return InstanceMeasurement(
        instance_id=instance_id, job_id="j", image_manifest_sha256="11" * 32, kernel_sha256="22" * 32,
        initrd_sha256="33" * 32, rootfs_sha256="44" * 32, cmdline="console=ttyS0", vmm="qemu-microvm",
        vmm_sha256="77" * 32, security_policy_sha256="88" * 32, security_policy={}, public_key="55" * 32)


def _policy(**over: Any) -> AttestationPolicy:
    return AttestationPolicy(agents=(AGENT,), vmms={"77" * 32: "qemu-microvm"}, security_policies=("88" * 32,),
                             images={"11" * 32: ImageReference(name="demo", kernel_sha256="22" * 32,
                                                               initrd_sha256="33" * 32, rootfs_sha256="44" * 32)},
                             require_ek_certificate=False, **over)


def _appraise(policy: AttestationPolicy, entries: list[Any]) -> Any:
    log = [e.model_dump(mode="json") for e in entries]
    return appraise(policy, SimpleNamespace(firmware_version=0), {15: replay(entries)}, log)  # type: ignore[arg-type]


def test_a_node_with_the_approved_guard_passes_and_its_instances_carry_it() -> None:
    appraisal = _appraise(_policy(guards=(GUARD,), require_guard=True), [_agent(GUARD), _instance("i-1")])
    assert appraisal.agent.guard_sha256 == GUARD and appraisal.instance_guards == {"i-1": GUARD}


@pytest.mark.parametrize(("entries", "reason"), [
    ([_agent("")], "guard_missing"),  # no guard loaded
    ([_agent("ef" * 32)], "guard_not_approved"),  # other programs or rules
    ([_agent(GUARD), _agent("")], "guard_missing"),  # the guard stopped: the agent logged a guard-less entry
])
def test_a_node_without_the_approved_guard_fails(entries: list[Any], reason: str) -> None:
    with pytest.raises(QuoteError) as err:
        _appraise(_policy(guards=(GUARD,), require_guard=True), entries)
    assert err.value.reason == reason


def test_history_is_history_but_an_instance_launched_unguarded_is_marked() -> None:
    """An agent that ran without the guard and was restarted with it passes; an instance it launched while
    unguarded is recorded as such, and the verifier refuses that instance's quote."""
    appraisal = _appraise(_policy(guards=(GUARD,), require_guard=True),
                          [_agent(""), _instance("i-old"), _agent(GUARD), _instance("i-new")])
    assert appraisal.instance_guards == {"i-old": "", "i-new": GUARD}


def test_a_policy_that_does_not_require_the_guard_accepts_a_node_without_one() -> None:
    assert _appraise(_policy(), [_agent("")]).agent.guard_sha256 == ""
