"""The job state machine: illegal transitions are refused, the legal path folds, re-applies are no-ops."""

from __future__ import annotations

from typing import Any

import pytest

from shared.codec import Codec, Event
from shared.errors import TransitionNotAllowed
from shared.events import (
    JobAccepted,
    JobCancelled,
    JobCancelRequested,
    JobFailed,
    JobPending,
    JobPlaced,
    JobRefused,
    JobSubmitted,
    NodeHeartbeat,
)
from shared.identity import Identity, Role
from shared.lifecycle import TERMINAL, JobBook, JobState, JobView, apply
from shared.models import ResourceClaim
from shared.pki import Pki

JOB = "job-1"
CLAIM = ResourceClaim(cpu_cores=2, ram_mib=1024)


class Factory:
    """Signed and verified events, exactly as a consumer would receive them."""

    def __init__(self, pki: Pki) -> None:
        trust = pki.load_trust()
        self.reader = Codec(None, trust)
        self.codecs = {
            who: Codec(pki.signer(ident), trust)
            for who, ident in {
                "market": Identity(Role.MARKETPLACE),
                "sched": Identity(Role.SCHEDULER),
                "janitor": Identity(Role.JANITOR),
                "node-a": Identity(Role.NODE_AGENT, "node-a"),
                "node-b": Identity(Role.NODE_AGENT, "node-b"),
            }.items()
        }
        self.clock = 1_000

    def make(self, who: str, payload: Any, job_id: str | None = JOB, node_id: str | None = None) -> Event:
        self.clock += 1_000
        out = self.codecs[who].encode(payload, job_id=job_id, node_id=node_id, time_ns=self.clock)
        return self.reader.decode(out.subject, out.data)

    def submitted(self, job_id: str = JOB) -> Event:
        return self.make("market", JobSubmitted(owner="alice", image="img"), job_id)

    def pending(self) -> Event:
        return self.make("sched", JobPending(reason="no_capacity"))

    def placed(self, node: str = "node-a", attempt: int = 0) -> Event:
        return self.make("sched", JobPlaced(node_id=node, attempt=attempt, claim=CLAIM, job=JobSubmitted(owner='o', image='i')), node_id=node)

    def accepted(self, node: str = "node-a", attempt: int = 0) -> Event:
        return self.make(node, JobAccepted(node_id=node, attempt=attempt))

    def refused(self, node: str = "node-a", attempt: int = 0) -> Event:
        return self.make(node, JobRefused(node_id=node, attempt=attempt, reason="gpu_missing"))

    def failed(self) -> Event:
        return self.make("janitor", JobFailed(reason="deadline_exceeded", phase="provisioning"))

    def cancelled(self) -> Event:
        return self.make("sched", JobCancelled(reason="client_request"))

    def cancel_requested(self) -> Event:
        return self.make("market", JobCancelRequested())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("lifecycle") / "pki")
    p.init(nodes=("node-a", "node-b"))
    return p


@pytest.fixture
def ev(pki: Pki) -> Factory:
    return Factory(pki)


def fold(*events: Event) -> JobView:
    view: JobView | None = None
    for e in events:
        view = apply(view, e)
    assert view is not None
    return view


def refused_in(view: JobView | None, event: Event) -> TransitionNotAllowed:
    with pytest.raises(TransitionNotAllowed) as info:
        apply(view, event)
    assert info.value.job_id == (event.job_id or "")
    assert info.value.event_type == str(event.spec.type)
    return info.value


# ---------------------------------------------------------------- illegal transitions


@pytest.mark.parametrize("kind", ["placed", "pending", "accepted", "refused", "failed", "cancelled",
                                  "cancel_requested"])
def test_nothing_before_submitted(ev: Factory, kind: str) -> None:
    exc = refused_in(None, getattr(ev, kind)())
    assert exc.state == "absent"


def test_accepted_while_pending(ev: Factory) -> None:
    view = fold(ev.submitted())
    assert view.state is JobState.PENDING
    assert refused_in(view, ev.accepted()).state == "pending"
    assert refused_in(view, ev.refused()).state == "pending"


def test_submitted_twice_with_new_id(ev: Factory) -> None:
    view = fold(ev.submitted())
    refused_in(view, ev.submitted())


def test_placed_while_placed(ev: Factory) -> None:
    view = fold(ev.submitted(), ev.placed())
    assert refused_in(view, ev.placed(node="node-b")).state == "placed"
    assert refused_in(view, ev.pending()).state == "placed"


@pytest.mark.parametrize(("node", "attempt"), [("node-b", 0), ("node-a", 1), ("node-b", 3)])
def test_accepted_or_refused_from_wrong_node_or_attempt(ev: Factory, node: str, attempt: int) -> None:
    view = fold(ev.submitted(), ev.placed(node="node-a", attempt=0))
    for event in (ev.accepted(node=node, attempt=attempt), ev.refused(node=node, attempt=attempt)):
        exc = refused_in(view, event)
        assert "node-a#0" in exc.state
    # The right node and attempt still works afterwards: the view was not changed.
    assert apply(view, ev.accepted()).state is JobState.PROVISIONING


def test_stale_accept_after_refusal(ev: Factory) -> None:
    """node-a refused attempt 0; an accept for attempt 0 arriving later must not move the job."""
    view = fold(ev.submitted(), ev.placed(), ev.refused())
    assert view.state is JobState.PENDING
    refused_in(view, ev.accepted(attempt=0))
    view = apply(view, ev.placed(node="node-b", attempt=1))
    refused_in(view, ev.accepted(node="node-a", attempt=0))
    refused_in(view, ev.accepted(node="node-b", attempt=0))
    assert apply(view, ev.accepted(node="node-b", attempt=1)).state is JobState.PROVISIONING


@pytest.mark.parametrize("terminal", ["failed", "cancelled"])
def test_nothing_after_terminal(ev: Factory, terminal: str) -> None:
    view = fold(ev.submitted(), ev.placed(), getattr(ev, terminal)())
    assert view.terminal
    assert view.state in TERMINAL
    for kind in ("submitted", "pending", "placed", "accepted", "refused", "failed", "cancelled",
                 "cancel_requested"):
        exc = refused_in(view, getattr(ev, kind)())
        assert exc.state == view.state.value


def test_non_job_event_is_refused(ev: Factory) -> None:
    view = fold(ev.submitted())
    heartbeat = ev.make("node-a", NodeHeartbeat(seq=1), job_id=None)
    with pytest.raises(TransitionNotAllowed):
        apply(view, heartbeat)


# ---------------------------------------------------------------- legal path


def test_legal_path_submitted_to_failed(ev: Factory) -> None:
    sub = ev.submitted()
    view = apply(None, sub)
    assert (view.state, view.job_id, view.submitted_id, view.attempt) == (JobState.PENDING, JOB, sub.id, 0)
    assert view.spec == sub.payload
    assert view.since_ns == sub.envelope.time_ns

    placed = ev.placed(node="node-a", attempt=0)
    view = apply(view, placed)
    assert (view.state, view.node_id, view.attempt) == (JobState.PLACED, "node-a", 0)
    assert view.since_ns == placed.envelope.time_ns

    refused = ev.refused(node="node-a", attempt=0)
    view = apply(view, refused)
    assert (view.state, view.node_id, view.attempt, view.reason) == (JobState.PENDING, None, 1, "gpu_missing")

    view = apply(view, ev.pending())
    assert (view.state, view.reason, view.attempt) == (JobState.PENDING, "no_capacity", 1)

    view = apply(view, ev.placed(node="node-b", attempt=1))
    assert (view.state, view.node_id, view.attempt) == (JobState.PLACED, "node-b", 1)

    accepted = ev.accepted(node="node-b", attempt=1)
    view = apply(view, accepted)
    assert (view.state, view.node_id, view.attempt) == (JobState.PROVISIONING, "node-b", 1)
    assert view.since_ns == accepted.envelope.time_ns
    assert not view.terminal

    view = apply(view, ev.cancel_requested())
    assert view.cancel_requested and view.state is JobState.PROVISIONING

    failed = ev.failed()
    view = apply(view, failed)
    assert (view.state, view.reason) == (JobState.FAILED, "deadline_exceeded")
    assert view.terminal
    assert view.since_ns == failed.envelope.time_ns
    assert len(view.seen) == 8
    assert view.spec == sub.payload  # the job's spec survives the whole fold


def test_cancel_from_pending(ev: Factory) -> None:
    view = fold(ev.submitted(), ev.cancel_requested(), ev.cancelled())
    assert view.state is JobState.CANCELLED
    assert view.cancel_requested
    assert view.reason == "client_request"


def test_apply_never_mutates(ev: Factory) -> None:
    view = fold(ev.submitted())
    before = (view.state, view.seen, view.node_id)
    new = apply(view, ev.placed())
    assert new is not view
    assert (view.state, view.seen, view.node_id) == before


# ---------------------------------------------------------------- idempotence


def test_reapplying_same_event_is_a_noop(ev: Factory) -> None:
    sub, placed, accepted = ev.submitted(), ev.placed(), ev.accepted()
    view = fold(sub, placed, accepted)
    # Redeliveries of events already folded, even ones that would now be illegal, change nothing.
    for again in (sub, placed, accepted):
        assert apply(view, again) is view
    failed = ev.failed()
    done = apply(view, failed)
    assert apply(done, failed) is done
    assert apply(done, sub) is done


def test_reapply_with_same_event_id_decoded_twice(ev: Factory, pki: Pki) -> None:
    """The same signed bytes decoded again (a JetStream redelivery) are recognised by event id."""
    out = ev.codecs["sched"].encode(JobPlaced(node_id="node-a", attempt=0, claim=CLAIM, job=JobSubmitted(owner='o', image='i')), job_id=JOB,
                                    node_id="node-a")
    first = ev.reader.decode(out.subject, out.data)
    second = ev.reader.decode(out.subject, out.data)
    assert first is not second and first.id == second.id
    view = apply(apply(None, ev.submitted()), first)
    assert apply(view, second) is view


def test_job_book(ev: Factory) -> None:
    book = JobBook()
    book.apply(ev.submitted("job-1"))
    book.apply(ev.submitted("job-2"))
    other = ev.make("sched", JobFailed(reason="x"), job_id="job-2")
    book.apply(other)
    assert {v.job_id for v in book.active()} == {"job-1"}
    view = book.get("job-2")
    assert view is not None and view.state is JobState.FAILED
    with pytest.raises(TransitionNotAllowed):
        book.apply(ev.make("sched", JobCancelled(reason="late"), job_id="job-2"))
    assert book.get("job-2") is view  # unchanged after an illegal event
    assert book.get("nope") is None


def test_a_late_placement_from_an_earlier_attempt_is_refused(ev: Factory) -> None:
    view = fold(ev.submitted(), ev.placed("node-a", 0), ev.refused("node-a", 0))
    assert view.state is JobState.PENDING and view.attempt == 1
    refused_in(view, ev.placed("node-b", 0))
    assert fold(ev.submitted(), ev.placed("node-a", 0), ev.refused("node-a", 0), ev.placed("node-b", 1)).node_id \
        == "node-b"
    refused_in(fold(ev.submitted()), ev.placed("node-a", 1))
