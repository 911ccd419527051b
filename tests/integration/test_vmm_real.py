"""Firecracker and Cloud Hypervisor for real: these run wherever the binary is on PATH and KVM works
(hosts), and skip with the reason elsewhere (neither installs here, and KVM does not work here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from services.node_agent.instance import Instance, InstanceSpec
from services.node_agent.vmm.cloud_hypervisor import CloudHypervisor
from services.node_agent.vmm.firecracker import Firecracker
from shared.image.manifest import load_public_keys
from tests.framework.images import build_test_image, run_once


@pytest.mark.parametrize(("binary", "driver"), [("firecracker", Firecracker), ("cloud-hypervisor", CloudHypervisor)])
async def test_real_vmm_runs_a_job(tmp_path: Path, binary: str, driver: type) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not on PATH")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    bundle = build_test_image(tmp_path / "images", with_vmlinux=True)
    keys = load_public_keys([tmp_path / "images" / "publisher.pub"])
    inst = Instance(InstanceSpec(f"real-{binary}", "job", bundle, ("sh", "-c", "echo written > /x && cat /x; exit 4")),
                    tmp_path / "instance", driver(), dict(keys))
    out = await run_once(inst)
    assert (out.exit_code, out.output) == (4, b"written\n")
