"""The catalogue is the single source of truth in fact: the consumers it documents are the ones the services
run, every subject comes from its helpers, every lifecycle state is reachable."""

from __future__ import annotations

import re
from pathlib import Path

from shared.consumers import CONSUMERS, READERS, consumers_of
from shared.docsgen import render_events_markdown
from shared.events import CATALOGUE, STREAMS, Domain, EventType, scope_filter, subject_filter
from shared.identity import Role
from shared.lifecycle import ALLOWED_FROM, JobState

ROOT = Path(__file__).resolve().parents[2]
SERVICE_OF = {Role.SCHEDULER: "scheduler", Role.NODE_AGENT: "node_agent", Role.ATTESTATION_VERIFIER:
              "attestation_verifier", Role.KEY_BROKER: "key_broker", Role.JANITOR: "janitor"}


def _source(role: Role) -> str:
    return "\n".join(p.read_text() for p in (ROOT / "services" / SERVICE_OF[role]).rglob("*.py"))


def test_every_declared_consumer_is_run_by_its_service_and_no_other() -> None:
    used: set[tuple[Role, str]] = set()
    for role in SERVICE_OF:
        src = _source(role)
        for r, key in re.findall(r'consumer_spec\(Role\.([A-Z_]+), "(\w+)"\)', src):
            assert Role[r] is role, f"services/{SERVICE_OF[role]} consumes {r}'s consumer {key}"
            used.add((role, key))
        used |= {(role, key) for key in re.findall(r'self\._consume\("(\w+)"', src)}  # the scheduler's helper
    declared = {(c.role, c.key) for c in CONSUMERS}
    assert used == declared, f"declared but not run: {declared - used}; run but not declared: {used - declared}"


def test_the_janitors_stream_readers_are_declared() -> None:
    src = _source(Role.JANITOR)
    block = src.split("follows = [", 1)[1].split("]\n", 1)[0]  # what the janitor's run() follows
    followed = {Domain[d] for d in re.findall(r"\(Domain\.([A-Z]+),", block)}
    assert followed == {r.domain for r in READERS if r.role is Role.JANITOR}


def test_the_events_doc_names_exactly_the_declared_consumers() -> None:
    doc = render_events_markdown()
    assert doc == (ROOT / "docs" / "events.md").read_text()
    for spec in CATALOGUE.values():
        section = doc.split(f"### `{spec.type.value}`", 1)[1].split("\n### ", 1)[0]
        line = next(ln for ln in section.splitlines() if ln.startswith("- **Consumers:**"))
        named = set(re.findall(r"`([a-z-]+)`", line))
        assert named == {r.value for r in consumers_of(spec.type)}, spec.type


def test_every_event_is_consumed_by_someone() -> None:
    unconsumed = [e for e in EventType if not consumers_of(e)]
    assert not unconsumed, unconsumed


def test_no_subject_is_built_by_hand_outside_the_catalogue() -> None:
    pattern = re.compile(r"""f?["']qvm\.(jobs|nodes|attestation|keys|teardown|dead)\.""")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for base in ("shared", "services") for p in (ROOT / base).rglob("*.py")
                 if p.name != "events.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_subject_helpers() -> None:
    assert scope_filter(Domain.JOBS, "j1") == "qvm.jobs.j1.>"
    assert scope_filter(Domain.ATTESTATION, "node-a") == "qvm.attestation.node-a.>"
    assert subject_filter(CATALOGUE[EventType.INSTANCE_ATTESTED], job_id="j1") == "qvm.jobs.j1.instance.attested.*"
    for bad in ("", "a.b", "*", ">"):
        try:
            scope_filter(Domain.KEYS, bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    for spec in CATALOGUE.values():
        assert spec.subject.startswith(STREAMS[spec.domain].subjects[0].removesuffix(">"))


def test_every_lifecycle_state_is_entered_by_some_event() -> None:
    src = (ROOT / "shared" / "lifecycle.py").read_text()
    entered = set(re.findall(r"state=_S\.([A-Z_]+)", src)) | {"PENDING"}  # a submission starts as pending
    assert entered == {s.name for s in JobState}, {s.name for s in JobState} - entered
    assert set(ALLOWED_FROM) <= {e for e in EventType if CATALOGUE[e].domain is Domain.JOBS}


def test_the_architecture_maps_generated_part_is_current() -> None:
    from shared.archgen import BEGIN, END, render_generated

    text = (ROOT / "docs" / "architecture.md").read_text()
    block = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert block == render_generated(), "docs/architecture.md is stale: run `make docs`"
    for folder in ("shared", "services/scheduler", "services/node_agent", "services/attestation_verifier",
                   "services/key_broker", "services/janitor", "tests", "bench", "deploy", "docs"):
        assert f"`{folder}/`" in text, f"the folder map misses {folder}"
