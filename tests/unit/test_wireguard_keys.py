"""WireGuard keys and the checks on what reaches `wg`: made and derived like `wg genkey`/`wg pubkey`,
malformed keys, CIDRs and endpoints refused, private keys never shown."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
from pydantic import ValidationError

from shared.errors import ConfigError
from shared.wireguard import (
    WgInterface,
    WgPeer,
    _parse_dump,
    generate_keypair,
    parse_private_key,
    parse_public_key,
    public_key_of,
)

needs_wg = pytest.mark.skipif(shutil.which("wg") is None, reason="wireguard-tools (`wg`) is not installed")


def _wg(*args: str, stdin: str = "") -> str:
    return subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, check=True).stdout.strip()


def test_generated_pair_is_wireguard_shaped_and_consistent() -> None:
    keys = generate_keypair()
    private, public = keys  # unpacks as (private, public)
    assert len(private) == len(public) == 44 and private.endswith("=") and public.endswith("=")
    raw = base64.b64decode(private)
    assert raw[0] & 7 == 0 and raw[31] & 0xC0 == 0x40  # clamped, as `wg genkey` makes them
    assert public_key_of(private) == public
    assert parse_public_key(public) == public and parse_private_key(private) == private
    assert generate_keypair() != keys


def test_private_key_never_in_repr() -> None:
    keys = generate_keypair()
    assert keys.private not in repr(keys) and keys.public in repr(keys)
    iface = WgInterface("wg-test0", keys.private, listen_port=51820, address="10.9.0.1/24")
    assert keys.private not in repr(iface) and keys.private not in str(iface)
    assert iface.public_key == keys.public and iface.implementation is None


@needs_wg
def test_our_keys_match_wg_pubkey() -> None:
    keys = generate_keypair()
    assert _wg("pubkey", stdin=keys.private + "\n") == keys.public


@needs_wg
def test_wg_genkey_keys_derive_the_same_public_key() -> None:
    private = _wg("genkey")
    assert public_key_of(private) == _wg("pubkey", stdin=private + "\n")


@pytest.mark.parametrize(("value", "why"), [
    ("", "exactly 32 bytes"),
    ("not base64 at all!", "not valid base64"),
    (base64.b64encode(b"\1" * 31).decode(), "exactly 32 bytes, got 31"),
    (base64.b64encode(b"\1" * 33).decode(), "exactly 32 bytes, got 33"),
    (base64.b64encode(b"\1" * 32).decode().rstrip("="), "not valid base64"),
    (base64.b64encode(b"\1" * 32).decode() + "\n", "not valid base64"),
    (" " + base64.b64encode(b"\1" * 32).decode(), "not valid base64"),
    (base64.b64encode(b"\1" * 32).decode()[:-2] + "B=", "not canonical"),  # stray bits in the last char
])
def test_parse_public_key_rejects(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_public_key(value)


def test_parse_public_key_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="base64 string"):
        parse_public_key(b"x" * 44)  # type: ignore[arg-type]


def test_bad_private_key_error_does_not_echo_it() -> None:
    bad = base64.b64encode(b"secret-but-short").decode()
    with pytest.raises(ConfigError) as err:
        WgInterface("wg-test0", bad)
    assert bad not in str(err.value) and "32 bytes" in str(err.value)


def test_peer_validation() -> None:
    pub = generate_keypair().public
    peer = WgPeer(public_key=pub, allowed_ips=["10.1.2.3/24", "fd00::1/64"], endpoint="[2001:db8::1]:51820")
    assert peer.allowed_ips == ("10.1.2.0/24", "fd00::/64")
    assert WgPeer(public_key=pub, endpoint="cp.example.net:51820").endpoint == "cp.example.net:51820"
    for bad in ({"public_key": "nope"}, {"public_key": pub, "allowed_ips": ["10.0.0.0/33"]},
                {"public_key": pub, "endpoint": "10.0.0.1"}, {"public_key": pub, "endpoint": "10.0.0.1:0"},
                {"public_key": pub, "endpoint": "2001:db8::1:51820"}, {"public_key": pub, "endpoint": "a b:1"},
                {"public_key": pub, "persistent_keepalive": -1}, {"public_key": pub, "extra": 1}):
        with pytest.raises(ValidationError):
            WgPeer(**bad)


@pytest.mark.parametrize("name", ["", "a" * 16, "wg/0", "wg 0", "wg:0"])
def test_interface_name_checked(name: str) -> None:
    with pytest.raises(ConfigError, match="interface name"):
        WgInterface(name, generate_keypair().private)


def test_interface_address_and_port_checked() -> None:
    with pytest.raises(ConfigError, match="bad address"):
        WgInterface("wg0", generate_keypair().private, address="10.0.0.300/24")
    with pytest.raises(ConfigError, match="listen port"):
        WgInterface("wg0", generate_keypair().private, listen_port=70000)


def test_parse_dump_skips_the_interface_line() -> None:
    me, a, b = generate_keypair(), generate_keypair(), generate_keypair()
    dump = "\n".join([
        f"{me.private}\t{me.public}\t51820\toff",
        f"{a.public}\t(none)\t192.0.2.7:40000\t10.9.0.2/32,fd00::2/128\t1700000000\t1234\t5678\t25",
        f"{b.public}\t(none)\t(none)\t(none)\t0\t0\t0\toff",
    ]) + "\n"
    pa, pb = _parse_dump(dump)
    assert (pa.public_key, pa.endpoint, pa.allowed_ips, pa.persistent_keepalive) == \
        (a.public, "192.0.2.7:40000", ("10.9.0.2/32", "fd00::2/128"), 25)
    assert (pa.latest_handshake, pa.rx_bytes, pa.tx_bytes) == (1700000000, 1234, 5678)
    assert (pb.endpoint, pb.allowed_ips, pb.persistent_keepalive, pb.latest_handshake) == (None, (), 0, 0)
    assert me.private not in repr([pa, pb])
