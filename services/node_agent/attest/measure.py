"""What the node-agent measures: its own code and settings, and each instance's launch inputs.

The digests a policy predicts (code, files, instance security policies) are defined in
`shared.tpm.digests`, which the policy generator (`qvm attest policy`) uses too, so an approved deployment
and its policy cannot drift apart silently. They are re-exported here beside what only the agent does:
its security settings, and the VMM binary it is about to start on this host.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.node_agent.settings import NodeAgentSettings
from shared.tpm.digests import code_digest, file_digest, instance_security_policy, security_policy_digest

__all__ = ["agent_config", "code_digest", "file_digest", "instance_security_policy", "security_policy_digest",
           "vmm_binary"]


def agent_config(settings: NodeAgentSettings) -> dict[str, str]:
    """The settings that change what a guest is exposed to (paths and tuning are left out)."""
    return {"vmm": settings.vmm, "vm_seccomp": str(settings.vm_seccomp).lower(),
            "vm_cgroups": str(settings.vm_cgroups).lower(), "vm_network": settings.vm_network,
            "egress": "enabled" if settings.egress_netns else "disabled"}


def vmm_binary(vmm: object) -> Path | None:
    """The executable a VMM driver starts (QEMU, Firecracker, Cloud Hypervisor), resolved on PATH."""
    name = getattr(vmm, "qemu", None) or getattr(vmm, "binary", None)
    found = shutil.which(name) if isinstance(name, str) else None
    return Path(found).resolve() if found else None
