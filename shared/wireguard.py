"""WireGuard keys and interfaces: the tunnel a node reaches the control plane's NATS through.

A node never dials NATS over the open network: the control plane's NATS listens on its WireGuard address
only, so whatever reaches it has come through the tunnel (authenticated by the node's WireGuard key) and
then passes mutual TLS (authenticated by the node's certificate). This module is the small, blocking layer
over `ip`, `wg` and `wireguard-go` that sets such a tunnel up; callers on an event loop run it in a thread.

Keys are WireGuard's own format (X25519, raw 32 bytes, standard base64), made with `cryptography`, so no
`wg genkey` is needed to make one. A private key is held in memory only: it reaches `wg` on its stdin
(`private-key /dev/stdin`), never a file or a command line (`/proc/*/cmdline` is world-readable), and is
never logged or shown in a `repr`.

The interface is kernel WireGuard when the kernel has it (`ip link add ... type wireguard` succeeds), else
userspace `wireguard-go` (hosts and containers without the module); `WgInterface.implementation` says
which. Every command is a full argv (never a shell), run through `ip netns exec <ns>` when the interface
lives in a network namespace. Failures raise `ConfigError` with the command and its stderr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import ConfigError
from shared.telemetry import get_logger

__all__ = [
    "Implementation",
    "WgInterface",
    "WgKeys",
    "WgPeer",
    "WgPeerStatus",
    "generate_keypair",
    "parse_private_key",
    "parse_public_key",
    "public_key_of",
]

log = get_logger(__name__)

Implementation = Literal["kernel", "wireguard-go"]

KEY_BYTES = 32
IFNAMSIZ = 15  # the kernel's limit on an interface name (16 with the terminating NUL)
COMMAND_TIMEOUT_S = 15.0
WIREGUARD_GO_READY_S = 10.0
WIREGUARD_GO_STOP_S = 5.0


# ---------------------------------------------------------------- keys


class WgKeys(NamedTuple):
    """A WireGuard key pair as base64 strings; unpacks as `(private, public)`. The private key is left out
    of the `repr` so that a logged or printed pair never shows it."""

    private: str
    public: str

    def __repr__(self) -> str:
        return f"WgKeys(private=<hidden>, public={self.public!r})"


def _decode_key(value: str, what: str) -> bytes:
    """The 32 raw bytes of a WireGuard key; `ValueError` naming `what` otherwise. Only the canonical
    encoding is accepted (what `wg` prints), so one key has one spelling wherever it is compared or stored."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64: {exc}") from exc
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{what} must decode to exactly {KEY_BYTES} bytes, got {len(raw)}")
    if base64.b64encode(raw).decode() != value:
        raise ValueError(f"{what} is not canonical base64 (expected 44 characters ending in '=')")
    return raw


def _clamp(raw: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` does, so our private keys are byte-identical to its kind (X25519
    clamps anyway when it uses a key: the public key is the same either way)."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def _public_b64(key: x25519.X25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def generate_keypair() -> WgKeys:
    """A fresh key pair from the OS's randomness (what `wg genkey | tee priv | wg pubkey` makes)."""
    raw = _clamp(os.urandom(KEY_BYTES))
    key = x25519.X25519PrivateKey.from_private_bytes(raw)
    return WgKeys(private=base64.b64encode(raw).decode(), public=_public_b64(key))


def parse_private_key(value: str) -> str:
    """`value` if it is a valid WireGuard private key (canonical base64 of 32 bytes), else `ValueError`.
    The message never repeats the value."""
    _decode_key(value, "WireGuard private key")
    return value


def public_key_of(private_b64: str) -> str:
    """The public key of a base64 private key (`wg pubkey`); `ValueError` for a malformed one."""
    raw = _decode_key(private_b64, "WireGuard private key")
    return _public_b64(x25519.X25519PrivateKey.from_private_bytes(raw))


def parse_public_key(value: str) -> str:
    """`value` if it is a valid WireGuard public key, else `ValueError` saying why.

    For keys from untrusted input (an enrolment request, a config file) before they reach `wg`'s command
    line: base64 (canonical, 44 characters) that decodes to exactly 32 bytes."""
    _decode_key(value, "WireGuard public key")
    return value


# ---------------------------------------------------------------- peers


def _endpoint(value: str) -> str:
    """`host:port` (`[v6]:port` for an IPv6 address); the host is not resolved here (`wg` does it)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint must be host:port with a port in 1..65535, got {value!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"endpoint has an unclosed '[': {value!r}")
        ipaddress.IPv6Address(host[1:-1])
    elif ":" in host:
        raise ValueError(f"an IPv6 endpoint must be written [address]:port, got {value!r}")
    if any(c.isspace() or c == "," for c in host):
        raise ValueError(f"endpoint host has whitespace or a comma: {value!r}")
    return value


class WgPeer(BaseModel):
    """One peer of an interface: who (public key), which inner addresses it may use as source and is routed
    (allowed IPs, normalised CIDRs), where to send to (endpoint; None for a peer that dials us, as the
    control plane sees its nodes) and how often to keep a NAT mapping open (0: off)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int = Field(0, ge=0, le=65535, description="Seconds; 0 turns it off.")

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return parse_public_key(v)

    @field_validator("allowed_ips")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_network(c, strict=False)) for c in v)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else _endpoint(v)


class WgPeerStatus(WgPeer):
    """A peer as `wg show dump` reports it: the configuration plus when it last shook hands (Unix seconds,
    0: never) and the bytes it moved."""

    latest_handshake: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0


def _parse_dump(text: str) -> list[WgPeerStatus]:
    """Peers from `wg show <if> dump`: the first line is the interface (it holds the private key, so it is
    skipped and never kept); each further line is one peer, tab-separated: public key, preshared key,
    endpoint, allowed ips, latest handshake, rx, tx, keepalive."""
    peers = []
    for line in text.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) != 8:
            raise ConfigError(f"unexpected `wg show dump` peer line with {len(cols)} fields")
        pub, _psk, endpoint, allowed, handshake, rx, tx, keepalive = cols
        peers.append(WgPeerStatus(
            public_key=pub,
            endpoint=None if endpoint == "(none)" else endpoint,
            allowed_ips=() if allowed == "(none)" else tuple(a for a in allowed.split(",") if a),
            persistent_keepalive=0 if keepalive == "off" else int(keepalive),
            latest_handshake=int(handshake), rx_bytes=int(rx), tx_bytes=int(tx),
        ))
    return peers


# ---------------------------------------------------------------- interface


def _interface_name(name: str) -> str:
    if not 0 < len(name) <= IFNAMSIZ or name in (".", "..") or any(c in name for c in "/:%") \
            or any(c.isspace() for c in name):
        raise ConfigError(f"bad interface name {name!r}: 1..{IFNAMSIZ} characters, no '/', ':', '%' or spaces")
    return name


@dataclass(eq=False)
class WgInterface:
    """One WireGuard interface: `up()` makes it, `add_peer`/`remove_peer`/`peers` manage it, `down()` removes it.

    `address` is the interface's own inner address with its prefix (`10.77.0.1/24`: the prefix routes the
    tunnel's subnet to it). `netns` names a network namespace (`ip netns add`) to make it in; every command
    then runs through `ip netns exec`. The private key stays in this object only (never in its `repr`).

    Userspace fallback: `wireguard-go` runs in the foreground (`-f`) as our child, rather than daemonising.
    A daemon is re-parented to PID 1, which in a container is often not an init and never reaps it (a
    zombie per interface), and its pid is unknown to us; as our child we can tell it died while starting
    (and show why: its log is a private temporary file, so no pipe can fill and block it), wait until its
    control socket answers, reap it, and kill it should deleting the link not end it. It gets a session of
    its own so a Ctrl-C in the caller's terminal does not take the tunnel down with it: like a kernel
    interface, it lives until `down()` (or until someone deletes the link, which ends wireguard-go too).
    Its control socket is `/var/run/wireguard/<name>.sock`, one filesystem for every namespace: names of
    userspace interfaces must be unique across namespaces.
    """

    name: str
    private_key: str = field(repr=False)
    listen_port: int | None = None
    address: str | None = None
    netns: str | None = None
    prefer: Implementation | None = None
    _implementation: Implementation | None = field(default=None, init=False, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _interface_name(self.name)
        try:
            parse_private_key(self.private_key)
        except ValueError as exc:
            raise ConfigError(f"interface {self.name}: {exc}") from None
        if self.listen_port is not None and not 0 <= self.listen_port < 65536:
            raise ConfigError(f"interface {self.name}: listen port {self.listen_port} out of range")
        if self.address is not None:
            try:
                ipaddress.ip_interface(self.address)
            except ValueError as exc:
                raise ConfigError(f"interface {self.name}: bad address: {exc}") from None

    # ---- properties
    @property
    def implementation(self) -> Implementation | None:
        """"kernel" or "wireguard-go" once `up()` has made the interface; None before (and after `down()`)."""
        return self._implementation

    @property
    def public_key(self) -> str:
        """What peers configure for this interface."""
        return public_key_of(self.private_key)

    # ---- commands
    def _argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _run(self, argv: list[str], *, stdin: str | None = None, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        """Run one command (in the namespace); `ConfigError` with its stderr when it fails and `check`.
        Secrets only ever travel in `stdin`, so the argv is safe to put in the error."""
        full = self._argv(argv)
        try:
            if stdin is None:
                done = subprocess.run(full, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      timeout=COMMAND_TIMEOUT_S, check=False)
            else:
                done = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                      check=False)
        except FileNotFoundError as exc:
            raise ConfigError(f"{full[0]} not found: install iproute2 and wireguard-tools") from exc
        except subprocess.TimeoutExpired as exc:
            raise ConfigError(f"`{' '.join(full)}` did not finish within {COMMAND_TIMEOUT_S}s") from exc
        if check and done.returncode != 0:
            raise ConfigError(f"`{' '.join(full)}` failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def exists(self) -> bool:
        """The link is there (in the namespace). False, too, when the namespace is gone (so is the link)."""
        return self._run(["ip", "link", "show", "dev", self.name], check=False).returncode == 0

    # ---- lifecycle
    def up(self) -> None:
        """Make the interface, give it its key, port and address, and bring it up.

        Kernel WireGuard when `ip link add ... type wireguard` works (unless `prefer` says otherwise), else
        `wireguard-go`. Anything failing after the link exists removes it again before raising."""
        if self._implementation is not None or self.exists():
            raise ConfigError(f"interface {self.name} already exists{f' in netns {self.netns}' if self.netns else ''}")
        self._implementation = self._create()
        try:
            args = ["wg", "set", self.name, "private-key", "/dev/stdin"]
            if self.listen_port is not None:
                args += ["listen-port", str(self.listen_port)]
            self._run(args, stdin=self.private_key + "\n")
            if self.address:
                self._run(["ip", "address", "add", self.address, "dev", self.name])
            self._run(["ip", "link", "set", "dev", self.name, "up"])
        except BaseException:
            with contextlib.suppress(ConfigError):  # the first failure is the one to report
                self.down()
            raise
        log.info("wireguard interface up", extra={"interface": self.name, "netns": self.netns,
                                                  "implementation": self._implementation,
                                                  "listen_port": self.listen_port, "address": self.address})

    def _create(self) -> Implementation:
        kernel_err = ""
        if self.prefer != "wireguard-go":
            done = self._run(["ip", "link", "add", "dev", self.name, "type", "wireguard"], check=False)
            if done.returncode == 0:
                return "kernel"
            kernel_err = done.stderr.strip()
            if self.prefer == "kernel":
                raise ConfigError(f"kernel WireGuard interface {self.name}: {kernel_err}")
        try:
            self._start_wireguard_go()
        except ConfigError as exc:
            if kernel_err:
                raise ConfigError(f"{exc} (kernel WireGuard unavailable too: {kernel_err})") from exc
            raise
        return "wireguard-go"

    def _start_wireguard_go(self) -> None:
        """Start `wireguard-go -f` and return once its control socket answers (`wg show` works)."""
        argv = self._argv(["wireguard-go", "-f", self.name])
        # wireguard-go keeps its own descriptor of the (unlinked) file once ours is closed
        with tempfile.TemporaryFile(prefix="wireguard-go-") as logf:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        env={**os.environ, "LOG_LEVEL": "error"}, start_new_session=True)
            except FileNotFoundError as exc:
                raise ConfigError(f"{argv[0]} not found: install wireguard-go (or load the wireguard module)") from exc
            self._proc = proc
            deadline = time.monotonic() + WIREGUARD_GO_READY_S
            while True:
                if proc.poll() is not None:
                    self._proc = None
                    logf.seek(0)
                    out = logf.read().decode(errors="replace").strip()
                    raise ConfigError(f"`{' '.join(argv)}` exited with {proc.returncode}: {out[-2000:]}")
                if self._run(["wg", "show", self.name, "listen-port"], check=False).returncode == 0:
                    return
                if time.monotonic() > deadline:
                    self._stop_wireguard_go()
                    raise ConfigError(f"`{' '.join(argv)}` did not open its control socket within "
                                      f"{WIREGUARD_GO_READY_S}s")
                time.sleep(0.05)

    def _stop_wireguard_go(self) -> None:
        """Reap our wireguard-go: it exits by itself once its link is deleted; else SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stop in (None, proc.terminate, proc.kill):
            if stop is not None and proc.poll() is None:
                stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(WIREGUARD_GO_STOP_S)
                return

    def down(self) -> None:
        """Delete the link and stop wireguard-go; safe to call again, or on an interface that never came up
        (also one another process made, by name)."""
        try:
            if self.exists():
                done = self._run(["ip", "link", "del", "dev", self.name], check=False)
                if done.returncode != 0 and self.exists():
                    raise ConfigError(f"deleting interface {self.name} failed: {done.stderr.strip()}")
        finally:
            self._stop_wireguard_go()
            if self._implementation is not None:
                log.info("wireguard interface down", extra={"interface": self.name, "netns": self.netns})
            self._implementation = None

    # ---- peers
    def add_peer(self, peer: WgPeer) -> None:
        """Add a peer, or update it (WireGuard keys peers by public key). Its allowed IPs replace any it had."""
        args = ["wg", "set", self.name, "peer", peer.public_key,
                "persistent-keepalive", str(peer.persistent_keepalive) if peer.persistent_keepalive else "off",
                "allowed-ips", ",".join(peer.allowed_ips)]
        if peer.endpoint:
            args += ["endpoint", peer.endpoint]
        self._run(args)

    def remove_peer(self, public_key: str) -> None:
        """Remove a peer (no error when it is not there: `wg` treats that as done)."""
        try:
            key = parse_public_key(public_key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._run(["wg", "set", self.name, "peer", key, "remove"])

    def peers(self) -> list[WgPeerStatus]:
        """The interface's peers as WireGuard has them now (`wg show <if> dump`)."""
        return _parse_dump(self._run(["wg", "show", self.name, "dump"]).stdout)
