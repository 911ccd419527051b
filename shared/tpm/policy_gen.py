"""Write an attestation policy from what is at hand: the signed images in a directory, this checkout's
node-agent code, the VMM binaries on this machine, the instance security policies the agent enforces.

Operators run it (`qvm attest policy`) where they build a release, review the result, and ship it to
the verifiers; the embedded stack writes one for itself at `qvm up`. It predicts the agent's measurements
with the agent's own definitions (`shared.tpm.digests`), never a copy of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import ValidationError

from shared.cvm.evidence import CVM_VMMS
from shared.errors import ConfigError
from shared.image.manifest import MANIFEST, ImageManifest
from shared.tpm.digests import QEMU, code_digest, file_digest, security_policy_digest
from shared.tpm.policy import AttestationPolicy, ImageReference

__all__ = ["GUEST_NET_ARG", "generate_policy", "local_policy", "snp_measurements"]

GUEST_NET_ARG = "qvm.net=172.31.255.2/30,172.31.255.1"
"""The kernel argument the node-agent adds for a guest with egress (services/node_agent/isolation/network.py's
`guest_net_arg`, which a test keeps equal to this): part of the measured command line."""


def generate_policy(images_dir: Path, vmm_binaries: dict[str, Path], *, ek_ca: Path | None = None,
                    measurement_pcr: int = 15, **overrides: object) -> AttestationPolicy:
    images: dict[str, ImageReference] = {}
    for manifest_file in sorted(images_dir.glob(f"*/{MANIFEST}")):
        try:
            manifest = ImageManifest.model_validate_json(manifest_file.read_bytes())
        except (OSError, ValidationError) as exc:
            raise ConfigError(f"{manifest_file}: not a readable image manifest ({str(exc)[:200]})") from None
        ref = ImageReference(name=manifest.name, kernel_sha256=manifest.kernel.sha256,
                             initrd_sha256=manifest.initrd.sha256, rootfs_sha256=manifest.rootfs.sha256,
                             vmlinux_sha256=manifest.vmlinux.sha256 if manifest.vmlinux else None)
        images[file_digest(manifest_file)] = ref
    # Every combination the agent can run with; operators drop the ones they do not allow.
    policies = sorted({security_policy_digest(s, c, n) for s in (True, False) for c in (True, False)
                       for n in (True, False)})
    fields: dict[str, object] = dict(
        measurement_pcr=measurement_pcr, pcrs=(measurement_pcr,), agents=(code_digest(),), images=images,
        vmms=_vmms_by_digest(vmm_binaries),
        security_policies=tuple(policies), ek_ca=ek_ca, require_ek_certificate=ek_ca is not None)
    fields.update(overrides)
    return AttestationPolicy.model_validate(fields)


def _vmms_by_digest(vmm_binaries: dict[str, Path]) -> dict[str, tuple[str, ...]]:
    """One binary may serve several drivers (QEMU: microvm and the confidential q35 guests)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, path in sorted(vmm_binaries.items()):
        digest = file_digest(path.resolve())
        out[digest] = (*out.get(digest, ()), name)
    return out


def snp_measurements(images_dir: Path, ovmf: Path, vcpus: tuple[int, ...], *,
                     vcpu_type: str = "EPYC-v4") -> tuple[str, ...]:
    """The SEV-SNP launch measurements of every image in `images_dir` as the confidential driver boots it
    (this OVMF, the image's kernel, initrd and command line, with and without the network argument, for each
    vCPU count a job may ask for). Blocking: hashes every image."""
    from shared.cvm.measure import snp_measurement

    out: set[str] = set()
    for manifest_file in sorted(images_dir.glob(f"*/{MANIFEST}")):
        try:
            manifest = ImageManifest.model_validate_json(manifest_file.read_bytes())
        except (OSError, ValidationError) as exc:
            raise ConfigError(f"{manifest_file}: not a readable image manifest ({str(exc)[:200]})") from None
        bundle = manifest_file.parent
        for cmdline in (manifest.cmdline, f"{manifest.cmdline} {GUEST_NET_ARG}"):
            for n in vcpus:
                out.add(snp_measurement(ovmf, bundle / manifest.kernel.file, bundle / manifest.initrd.file, cmdline,
                                        n, vcpu_type))
    return tuple(sorted(out))


def local_policy(images_dir: Path, *, ek_ca: Path | None = None, measurement_pcr: int = 15,
                 qemu: str = QEMU, guard_digest: str = "") -> AttestationPolicy:
    """The policy for this machine: its images, this checkout's agent, the QEMU found on PATH (for microvm
    guests and for confidential ones, which the same binary starts on q35), and, given its digest, this
    machine's runtime guard, then required (a node without it, or with other rules, is not trusted)."""
    found = shutil.which(qemu)
    drivers = ("qemu-microvm", *CVM_VMMS)
    guard: dict[str, object] = {"guards": (guard_digest,), "require_guard": True} if guard_digest else {}
    return generate_policy(images_dir, {name: Path(found) for name in drivers} if found else {}, ek_ca=ek_ca,
                           measurement_pcr=measurement_pcr, **guard)
