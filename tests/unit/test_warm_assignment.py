"""Warm instances in the measured launch: an instance launched with no job is bound to one job by an
assignment entry; a verifier takes one per instance (a warm instance is never reused), only for an instance
the log launched warm, and only under the key it was launched with. A launch may name the image's bzImage or
its ELF vmlinux (QEMU's PVH boot, Firecracker), both from the approved manifest, nothing else."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from shared.tpm.measurements import AgentMeasurement, AssignmentMeasurement, InstanceMeasurement, replay
from shared.tpm.policy import AttestationPolicy, ImageReference, appraise
from shared.tpm.quote import QuoteError

AGENT = "ab" * 32
KEY = "55" * 32


def _agent() -> AgentMeasurement:
    return AgentMeasurement(node_id="n", agent_version="1", agent_sha256=AGENT, config_sha256="cd" * 32)


def _launch(instance_id: str, job_id: str = "", kernel: str = "22" * 32) -> InstanceMeasurement:
    return InstanceMeasurement(
        instance_id=instance_id, job_id=job_id, image_manifest_sha256="11" * 32, kernel_sha256=kernel,
        initrd_sha256="33" * 32, rootfs_sha256="44" * 32, cmdline="console=ttyS0", vmm="qemu-microvm",
        vmm_sha256="77" * 32, security_policy_sha256="88" * 32, security_policy={}, public_key=KEY)


def _assign(instance_id: str, job_id: str, key: str = KEY) -> AssignmentMeasurement:
    return AssignmentMeasurement(instance_id=instance_id, job_id=job_id, public_key=key)


def _appraise(entries: list[Any]) -> Any:
    policy = AttestationPolicy(
        agents=(AGENT,), vmms={"77" * 32: "qemu-microvm"}, security_policies=("88" * 32,),
        images={"11" * 32: ImageReference(name="demo", kernel_sha256="22" * 32, vmlinux_sha256="99" * 32,
                                          initrd_sha256="33" * 32, rootfs_sha256="44" * 32)},
        require_ek_certificate=False)
    log = [e.model_dump(mode="json") for e in entries]
    return appraise(policy, SimpleNamespace(firmware_version=0), {15: replay(entries)}, log)  # type: ignore[arg-type]


def test_a_warm_launch_is_bound_to_the_job_it_was_assigned() -> None:
    appraisal = _appraise([_agent(), _launch("w-1"), _launch("w-2"), _assign("w-1", "job-a")])
    assert appraisal.instances["w-1"].job_id == "job-a"
    assert appraisal.instances["w-2"].job_id == ""  # still warm: no job's challenge names it


@pytest.mark.parametrize(("entries", "reason"), [
    ([_agent(), _launch("w-1"), _assign("w-1", "job-a"), _assign("w-1", "job-b")], "instance_reassigned"),
    ([_agent(), _launch("i-1", job_id="job-a"), _assign("i-1", "job-b")], "instance_reassigned"),
    ([_agent(), _assign("w-9", "job-a")], "assignment_unlaunched"),
    ([_agent(), _launch("w-1"), _assign("w-1", "job-a", key="66" * 32)], "assignment_key_mismatch"),
])
def test_an_assignment_the_log_cannot_back_fails(entries: list[Any], reason: str) -> None:
    with pytest.raises(QuoteError) as err:
        _appraise(entries)
    assert err.value.reason == reason


def test_either_kernel_of_the_approved_image_and_no_other() -> None:
    assert _appraise([_agent(), _launch("i-1", "j", kernel="99" * 32)]).instances["i-1"].kernel_sha256 == "99" * 32
    with pytest.raises(QuoteError) as err:
        _appraise([_agent(), _launch("i-1", "j", kernel="98" * 32)])
    assert err.value.reason == "measurement_not_allowed"
