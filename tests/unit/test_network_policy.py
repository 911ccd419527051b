"""Egress allowlist entries are parsed strictly: anything unclear is refused, never widened."""

from __future__ import annotations

import pytest

from services.node_agent.isolation.network import NetworkError, parse_egress


def test_valid_entries() -> None:
    rules = parse_egress(["198.18.0.1:8080", "10.0.0.0/8:443"])
    assert [(str(r.net), r.port) for r in rules] == [("198.18.0.1/32", 8080), ("10.0.0.0/8", 443)]
    assert 'ip daddr 10.0.0.0/8 tcp dport 443 ct state new accept' in rules[1].nft("qv1")


@pytest.mark.parametrize("entry", ["pypi.org:443", "198.18.0.1", "198.18.0.1:0", "198.18.0.1:70000", "::1:443",
                                   "1.2.3.4:80; drop", "0.0.0.0/0:x"])
def test_invalid_entries_are_refused(entry: str) -> None:
    with pytest.raises(NetworkError) as exc:
        parse_egress([entry])
    assert exc.value.reason == "egress_invalid"
