"""docs/events.md is generated from the catalogue and must be kept current."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from shared.consumers import CONSUMERS
from shared.docsgen import render_events_markdown
from shared.events import CATALOGUE, STREAMS, EventType

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_events_markdown()


def test_rendering_is_deterministic(rendered: str) -> None:
    assert render_events_markdown() == rendered


def test_events_doc_is_current(rendered: str) -> None:
    assert DOC.is_file(), f"{DOC} is missing: run `make docs` (python -m shared.docsgen > docs/events.md)"
    committed = DOC.read_text(encoding="utf-8")
    if committed != rendered:
        diff = "".join(
            list(difflib.unified_diff(
                committed.splitlines(keepends=True), rendered.splitlines(keepends=True),
                "docs/events.md (committed)", "render_events_markdown()",
            ))[:60]
        )
        pytest.fail(
            "docs/events.md is out of date with the event catalogue: run `make docs` "
            f"(python -m shared.docsgen > docs/events.md)\n{diff}",
            pytrace=False,
        )


@pytest.mark.parametrize("event_type", list(EventType), ids=str)
def test_every_event_type_is_documented(rendered: str, event_type: EventType) -> None:
    assert f"### `{event_type.value}`" in rendered, f"{event_type} has no section in the events doc"
    spec = CATALOGUE[event_type]
    assert f"`{spec.subject}`" in rendered


def test_streams_consumers_and_dead_letters_are_documented(rendered: str) -> None:
    for stream in STREAMS.values():
        assert f"`{stream.name}`" in rendered
    for consumer in CONSUMERS:
        assert f"-{consumer.key}`" in rendered or f"-{consumer.key}-" in rendered
    assert "## Dead letters" in rendered
    assert "## Consumers" in rendered


def test_nested_payload_fields_are_listed(rendered: str) -> None:
    # $refs are resolved: fields of nested models appear under dotted paths.
    assert "`profile.gpus.count`" in rendered
    assert "`inventory.gpus[].uuid`" in rendered
    assert "`claim.cpu_cores`" in rendered
    assert "$ref" not in rendered and "$defs" not in rendered


def test_the_cluster_configs_in_deploy_are_generated_from_the_code() -> None:
    """deploy/nats/cluster/node-*.conf are what `python -m shared.natsconf` writes (`make docs`): the same server
    and cluster blocks as `qvm up --nats-servers 3`, so they cannot drift from what the tests run."""
    from shared.natsconf import deploy_cluster_configs

    root = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "cluster"
    for name, text in deploy_cluster_configs().items():
        assert (root / name).read_text() == text, f"{name} is stale: run make docs"
    compose = (root.parents[2] / "docker-compose.cluster.yml").read_text()
    assert all(f"/etc/nats/cluster/{name}" in compose for name in deploy_cluster_configs())
