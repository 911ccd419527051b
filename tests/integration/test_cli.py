"""The `qvm` CLI as an operator uses it: `qvm up` in the background, then submit, status, nodes, events,
audit; Ctrl-C stops everything and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.nats


def qvm(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_qvm_up_submit_status_audit_and_clean_stop(tmp_path: Path) -> None:
    env = {**os.environ, "QVM_STATE_DIR": str(tmp_path / "state"), "QVM_NODE_ID": "cli-node",
           "QVM_HEARTBEAT_INTERVAL_S": "1", "COLUMNS": "200"}
    env.pop("QVM_NATS_URL", None)
    # Images first: `qvm up` writes the embedded verifier's policy from the images it finds.
    images = tmp_path / "state" / "images"
    assert qvm(env, "image", "keygen", str(images)).returncode == 0
    root = tmp_path / "root" / "etc"
    root.mkdir(parents=True)
    (root / "qvm-demo.txt").write_text("from the test image\n")
    built = qvm(env, "image", "build", "qvm-demo-image", "--out", str(images / "qvm-demo-image"),
                "--key", str(images / "publisher.key"), "--rootfs-dir", str(root.parent), "--with-busybox",
                timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    verified = qvm(env, "image", "verify", str(images / "qvm-demo-image"), "--pubkey", str(images / "publisher.pub"))
    assert verified.returncode == 0 and "verified" in verified.stdout
    up = subprocess.Popen([sys.executable, "-m", "shared.cli.main", "up"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url_file = tmp_path / "state" / "nats.url"
        deadline = time.monotonic() + 60
        while not url_file.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "qvm up did not start"
            time.sleep(0.1)

        deadline = time.monotonic() + 60  # registered, then enrolled (swtpm) and trusted
        while "trusted" not in (nodes := qvm(env, "nodes")).stdout or "unverified" in nodes.stdout:
            assert time.monotonic() < deadline, nodes.stdout + nodes.stderr
            time.sleep(0.3)
        assert "cli-node" in nodes.stdout and "online" in nodes.stdout


        sub = qvm(env, "submit", "deploy/examples/job.yaml", "--wait", "120", timeout=180)
        assert sub.returncode == 0, sub.stderr
        assert "job.accepted" in sub.stdout and "instance.attested" in sub.stdout and "job.done" in sub.stdout
        # The output, sealed to a key `submit --wait` made for the run, opened and verified by it.
        assert "| from the test image" in sub.stdout and "opened with the client's key and verified" \
            in sub.stdout, sub.stdout

        # As a client: verify the instance, release a secret, follow the job and open its sealed output.
        secret = tmp_path / "token.txt"
        secret.write_text("s3cret-token")
        client = qvm(env, "client", "run", "deploy/examples/confidential-job.yaml", "--image-bundle",
                     str(images / "qvm-demo-image"), "--secret", f"api-token=@{secret}", timeout=300)
        assert client.returncode == 0, client.stdout + client.stderr
        assert "released 1 secret(s)" in client.stdout and "| digest: " in client.stdout, client.stdout
        assert "opened with the client's key and verified" in client.stdout, client.stdout

        status = qvm(env, "status")
        assert "demo-job" in status.stdout and "done" in status.stdout and "cli-node" in status.stdout
        one = qvm(env, "status", "demo-job")
        assert "job.placed" in one.stdout and "node-agent.cli-node" in one.stdout

        events = qvm(env, "events")
        assert "node.registered" in events.stdout and "job.accepted" in events.stdout and "✗" not in events.stdout
        assert "output=sealed," in events.stdout and "from the test image" not in events.stdout, events.stdout

        audit = qvm(env, "audit", "replay", "--workers", "0")
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "audit clean" in audit.stdout

        # A cancellation while the job runs: a long job, cancelled once its VM is up.
        long_job = tmp_path / "long.yaml"
        long_job.write_text("id: long-job\nowner: t\nimage: qvm-demo-image\ncommand: [sleep, '600']\n")
        assert qvm(env, "submit", str(long_job)).returncode == 0
        deadline = time.monotonic() + 120
        while "instance.running" not in qvm(env, "status", "long-job").stdout:
            assert time.monotonic() < deadline, "long job did not start"
            time.sleep(0.5)
        assert qvm(env, "cancel", "long-job").returncode == 0
        deadline = time.monotonic() + 60
        while "instance.destroyed" not in (st := qvm(env, "status", "long-job")).stdout:
            assert time.monotonic() < deadline, "cancellation not carried out: " + st.stdout
            time.sleep(0.5)
        assert "cancelled" in st.stdout
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "qvm stack stopped" in out
    assert _processes_mentioning(str(tmp_path)) == [], "qvm up left processes running"
    assert not (tmp_path / "state" / "nats.url").exists()


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment names `text` (the services get the state dir by env)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(proc.name))
    return found
