"""swtpm, the software TPM qvm uses for development, tests and the embedded demo stack.

`SwtpmState.manufacture()` runs `swtpm_setup` once: it creates the endorsement keys and EK certificates
signed by a local CA that lives beside the state (`ek-ca.pem` is what a verifier pins for dev nodes).
`Swtpm` runs the TPM on two adjacent loopback ports: the tss2 swtpm TCTI always talks to the control
channel on the data port + 1, so the pair is chosen together. `restart()` power-cycles the TPM (a
reboot: PCRs cleared, resetCount incremented), which the reboot tests need.

Hosts use the kernel's resource manager (`device:/dev/tpmrm0`); nothing here runs there.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

__all__ = ["Swtpm", "SwtpmState"]

# TPM2_Shutdown(TPM_SU_CLEAR): tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_Shutdown, shutdownType
_TPM2_SHUTDOWN_CLEAR = bytes.fromhex("80010000000c0000014500" + "00")


@dataclass(frozen=True)
class SwtpmState:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def ek_ca(self) -> Path:
        """Root and issuer certificates of the local CA that signed this TPM's EK certificates."""
        return self.root / "ek-ca.pem"

    def manufacture(self) -> SwtpmState:
        """Create the TPM's state with EK certificates (idempotent)."""
        if (self.state / "tpm2-00.permall").exists():
            return self
        for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
            if shutil.which(tool) is None:
                raise ConfigError(f"{tool} is not installed (apt install swtpm swtpm-tools)")
        ca = self.root / "localca"
        for d in (self.state, ca):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "localca.conf").write_text(
            f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
            f"certserial = {ca}/certserial\n")
        (self.root / "localca.options").write_text(
            "--platform-manufacturer qvm\n--platform-version 2.1\n--platform-model swtpm\n")
        (self.root / "setup.conf").write_text(
            f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
            f"create_certs_tool_config = {self.root}/localca.conf\n"
            f"create_certs_tool_options = {self.root}/localca.options\nactive_pcr_banks = sha256\n")
        proc = subprocess.run(
            ["swtpm_setup", "--tpm2", "--tpmstate", str(self.state), "--create-ek-cert", "--overwrite",
             "--config", str(self.root / "setup.conf")], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise ConfigError(f"swtpm_setup failed: {(proc.stdout + proc.stderr).strip()[-400:]}")
        self.ek_ca.write_bytes((ca / "swtpm-localca-rootca-cert.pem").read_bytes()
                               + (ca / "issuercert.pem").read_bytes())
        return self


def _die_with_parent() -> None:
    """In the child before exec: a TPM outliving the process that started it (a crashed test) would hold
    its state directory's lock forever."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _adjacent_ports() -> int:
    """A free loopback port P with P+1 also free (the TCTI's control port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise ConfigError("no two adjacent free loopback ports for swtpm")


class Swtpm:
    """One running swtpm process over a manufactured state."""

    def __init__(self, state: SwtpmState) -> None:
        self.state = state
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self, timeout_s: float = 10.0) -> Swtpm:
        self.state.manufacture()
        for _ in range(5):  # a port taken between the probe and the bind: pick another pair
            self.port = _adjacent_ports()
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state.state}",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear", "--log", f"level=1,file={self.state.root}/swtpm.log"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port + 1), 0.2):
                    return self
                time.sleep(0.02)
            self.stop()
        raise ConfigError(f"swtpm did not start (see {self.state.root}/swtpm.log)")

    def restart(self, orderly: bool = True) -> None:
        """Power-cycle the TPM: what a host reboot does to it."""
        self.stop(orderly)
        self.start()

    def stop(self, orderly: bool = True) -> None:
        """Power the TPM off; `orderly` first sends TPM2_Shutdown(CLEAR), as an OS does before a reboot
        (a TPM switched off without it reports its clock as not `safe` for a while)."""
        if self.proc is not None and self.proc.poll() is None and orderly:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 2) as s:
                s.sendall(_TPM2_SHUTDOWN_CLEAR)
                s.settimeout(2)
                s.recv(64)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
