#!/usr/bin/env bash
# The backbone's real-hardware check, for a machine with an NVIDIA GPU and no network (the lent device):
# qvm's Python dependencies travel as wheels in .whl/ (see README, "Checks on a GPU machine").
# Prints the NVML inventory, then runs the NVML tests (a GPU job placed on and accepted for the real GPU),
# and the placement, security and unit tests. The micro VM tests need QEMU and the guest kernel package,
# which such a machine lacks; they run in CI and on hosts.
set -u
OUT=${OUT:-/tmp/qvm-device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/backbone-check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
echo "== machine"; python3 --version; nproc; nvidia-smi -L
echo "== NVML inventory as the node-agent reads it"
python3 -c 'from services.node_agent.inventory import HostReader; print(HostReader().inventory().model_dump_json(indent=1))'
echo "== NVML tests (skipped where there is no GPU)"
python3 -m pytest -q -p no:cacheprovider -rs tests/integration/test_nvml.py; echo "nvml tests rc=$?"
echo "== unit, placement, security tests"
python3 -m pytest -q -p no:cacheprovider -n 8 tests/unit tests/integration/test_flow.py \
  tests/integration/test_security.py tests/integration/test_registry.py 2>&1 | tail -n 15
echo "suite rc=${PIPESTATUS[0]}"
