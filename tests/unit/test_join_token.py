"""The join token's format: what a hoster pastes, checked before anything is sent."""

from __future__ import annotations

import pytest

from shared.join.token import JoinToken, ca_fingerprint


def test_a_token_round_trips_and_is_stored_only_as_a_digest() -> None:
    token = JoinToken.new("gpu-host-1", b"ca der")
    text = str(token)
    assert text.startswith("qvmjoin1.gpu-host-1.") and len(text.split(".")) == 4
    again = JoinToken.parse(text)
    assert again == token and again.digest == token.digest
    assert token.ca_fingerprint == ca_fingerprint(b"ca der")
    assert token.secret not in token.digest and len(token.digest) == 64
    assert JoinToken.new("gpu-host-1", b"ca der").digest != token.digest  # 256 fresh bits each


@pytest.mark.parametrize("text", [
    "", "qvmjoin1", "qvmjoin2.node.aaaa.bbbb", "qvmjoin1.Node.{fp}.{s}", "qvmjoin1.no.de.{fp}.{s}",
    "qvmjoin1.node.{fp}", "qvmjoin1.node.{fp}.short", "qvmjoin1.node.{fp}.{s}x", "qvmjoin1.node.{fp}.{s}" + "a" * 300,
    "qvmjoin1.node.{fp}.{bad}",
])
def test_malformed_tokens_are_refused_without_echoing_them(text: str) -> None:
    good = JoinToken.new("node", b"x")
    text = text.format(fp=good.ca_fingerprint, s=good.secret, bad="!" * 43)
    with pytest.raises(ValueError) as info:
        JoinToken.parse(text)
    assert good.secret not in str(info.value)


def test_node_ids_are_subject_tokens() -> None:
    with pytest.raises(ValueError):
        JoinToken.new("a.b", b"x")
    with pytest.raises(ValueError):
        JoinToken.new("*", b"x")
