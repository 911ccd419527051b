"""Generate the event reference (`docs/events.md`) from the catalogue, the codec and the consumers.

The document is a pure function of the code: the same sources always give byte-identical Markdown (no
dates, no set ordering), so a unit test can insist that the committed file is current. Regenerate it
with `python -m shared.docsgen > docs/events.md` (`make docs`).

One module (over 400 lines) on purpose: it renders one page, and its parts (the JSON-schema walk that lists
nested payload fields, the tables, the page sections) are small functions nothing else uses.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any, cast

from pydantic import BaseModel

from shared.codec import MAX_MESSAGE_BYTES, WIRE_VERSION, Envelope
from shared.consumers import CONSUMERS, READERS, ConsumerSpec, consumers_of
from shared.errors import Reason
from shared.events import CATALOGUE, DEAD_LETTER_SUBJECT, STREAMS, Domain, EventSpec, EventType
from shared.identity import Identity, Role

__all__ = ["main", "render_events_markdown"]

Schema = Mapping[str, Any]

_ROLE_ORDER = {r: i for i, r in enumerate(Role)}
_NODE_PLACEHOLDER = "0node0placeholder0"  # a valid node id, replaced by `{node_id}` in rendered names


# ---------------------------------------------------------------- Markdown helpers


def _cell(text: str) -> str:
    """Make text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    head = list(headers)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _roles(roles: Iterable[Role]) -> str:
    ordered = sorted(roles, key=lambda r: _ROLE_ORDER[r])
    return ", ".join(_code(r.value) for r in ordered) or "—"


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------- JSON schema → field rows


class _Schema:
    """One model's JSON schema with its `$defs`, resolving local references."""

    def __init__(self, model: type[BaseModel]) -> None:
        schema = model.model_json_schema()
        self.root: Schema = schema
        self.defs: Mapping[str, Schema] = schema.get("$defs", {})

    def ref_name(self, s: Schema) -> str | None:
        ref = s.get("$ref")
        if not isinstance(ref, str):
            return None
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        return ref.removeprefix("#/$defs/")

    def resolve(self, s: Schema) -> Schema:
        """Follow `$ref`s (keeping nothing of the referring schema)."""
        seen: set[str] = set()
        while (name := self.ref_name(s)) is not None:
            if name in seen:
                raise ValueError(f"reference cycle at {name}")
            seen.add(name)
            s = self.defs[name]
        return s

    def is_model(self, s: Schema) -> bool:
        r = self.resolve(s)
        return r.get("type") == "object" and "properties" in r

    def type_of(self, s: Schema) -> str:
        name = self.ref_name(s)
        if name is not None:
            target = self.resolve(s)
            return f"{name} (enum)" if "enum" in target else name
        if "anyOf" in s:
            return " | ".join(self.type_of(m) for m in s["anyOf"])
        if "const" in s:
            return f"const {_json(s['const'])}"
        if "enum" in s:
            return f"{s.get('type', 'value')} (enum)"
        t = s.get("type")
        if isinstance(t, list):
            return " | ".join(str(x) for x in t)
        if t == "array":
            if "prefixItems" in s:
                return "tuple[" + ", ".join(self.type_of(i) for i in s["prefixItems"]) + "]"
            items = s.get("items")
            return f"array of {self.type_of(items)}" if isinstance(items, Mapping) else "array"
        if t == "object":
            if "properties" in s:
                return str(s.get("title", "object"))
            extra = s.get("additionalProperties")
            if isinstance(extra, Mapping):
                return f"map of string → {self.type_of(extra)}"
            return "map of string → any"
        if t is None:
            return "any"
        return str(t)

    def constraints(self, s: Schema) -> list[str]:
        """Human-readable constraints of a schema, including those of its non-null `anyOf` members."""
        out: list[str] = []
        members = [m for m in s.get("anyOf", []) if m.get("type") != "null"] if "anyOf" in s else [s]
        for m in members:
            target = self.resolve(m)
            if "enum" in target:
                out.append("one of " + ", ".join(_code(str(v)) for v in target["enum"]))
            if "pattern" in m:
                out.append(f"pattern {_code(str(m['pattern']))}")
            if "format" in m:
                out.append(f"format {m['format']}")
            out += _bounds(m, "minLength", "maxLength", "length")
            out += _bounds(m, "minimum", "maximum", "value")
            out += _bounds(m, "exclusiveMinimum", "exclusiveMaximum", "value", strict=True)
            out += _bounds(m, "minItems", "maxItems", "items")
            out += _bounds(m, "minProperties", "maxProperties", "entries")
            if m.get("type") == "array" and isinstance(m.get("items"), Mapping):
                inner = self.constraints(m["items"])
                if inner and not self.is_model(m["items"]):
                    out.append("each item: " + ", ".join(inner))
            if m.get("type") == "object" and isinstance(m.get("additionalProperties"), Mapping):
                inner = self.constraints(m["additionalProperties"])
                if inner:
                    out.append("each value: " + ", ".join(inner))
        return out

    def rows(self, model: Schema, prefix: str = "", stack: tuple[str, ...] = ()) -> list[list[str]]:
        """One row per field, then the fields of nested models under a dotted path."""
        props: Mapping[str, Schema] = model.get("properties", {})
        required = set(model.get("required", []))
        out: list[list[str]] = []
        for name, prop in props.items():
            path = prefix + name
            if name in required:
                presence = "required"
            elif "default" in prop:
                presence = f"default {_code(_json(prop['default']))}"
            else:
                presence = "optional"
            target = self.resolve(prop)
            description = prop.get("description") or (
                target.get("description") if self.ref_name(prop) is not None else None
            )
            constraints = self.constraints(prop)
            examples = prop.get("examples")
            if isinstance(examples, list) and examples:
                constraints.append("e.g. " + ", ".join(_code(str(e)) for e in examples))
            out.append([_code(path), self.type_of(prop), presence, "; ".join(constraints) or "—",
                        str(description or "—")])
            for sub_path, sub in self._nested(prop, path):
                title = str(self.resolve(sub).get("title", ""))
                if title in stack:  # recursive models: list each level once
                    continue
                out += self.rows(self.resolve(sub), sub_path, (*stack, title))
        return out

    def _nested(self, prop: Schema, path: str) -> list[tuple[str, Schema]]:
        """Nested models reachable from a field: directly, optionally, as list items or as map values."""
        found: list[tuple[str, Schema]] = []
        members = prop.get("anyOf", [prop])
        for m in members:
            if self.is_model(m):
                found.append((path + ".", m))
                continue
            r = self.resolve(m)
            if r.get("type") == "array" and isinstance(r.get("items"), Mapping) and self.is_model(r["items"]):
                found.append((path + "[].", r["items"]))
            extra = r.get("additionalProperties")
            if r.get("type") == "object" and isinstance(extra, Mapping) and self.is_model(extra):
                found.append((path + ".<key>.", extra))
        return found


def _bounds(s: Schema, lo_key: str, hi_key: str, what: str, *, strict: bool = False) -> list[str]:
    lo, hi = s.get(lo_key), s.get(hi_key)
    op = "<" if strict else "≤"
    if lo is not None and hi is not None:
        return [f"{lo} {op} {what} {op} {hi}"]
    if lo is not None:
        return [f"{what} {'>' if strict else '≥'} {lo}"]
    if hi is not None:
        return [f"{what} {op} {hi}"]
    return []


_FIELD_HEADERS = ("Field", "Type", "Required / default", "Constraints", "Description")


def _field_table(model: type[BaseModel]) -> list[str]:
    schema = _Schema(model)
    rows = schema.rows(schema.root, stack=(str(schema.root.get("title", "")),))
    if not rows:
        return ["This payload has no fields (an empty map)."]
    return _table(_FIELD_HEADERS, rows)


# ---------------------------------------------------------------- sections


def _intro() -> list[str]:
    return [
        "# qvm events",
        "",
        "<!-- Generated by `python -m shared.docsgen` from shared/events.py, shared/codec.py and",
        "     shared/consumers.py. Do not edit by hand: run `make docs`. -->",
        "",
        "qvm's services never call each other: they only publish and consume the signed events below, over "
        "NATS JetStream with mutual TLS. Every event type has exactly one subject template, one stream, "
        "a fixed set of roles allowed to produce it and a versioned payload schema; the NATS permissions, "
        "the consumers and this document are all generated from the same catalogue (`shared/events.py`).",
        "",
        "## Wire format",
        "",
        f"Each message is a msgpack array `[{WIRE_VERSION}, envelope_bytes, signer, ed25519_signature]`:",
        "",
        f"- `{WIRE_VERSION}` is the wire version;",
        "- `envelope_bytes` is the msgpack encoding of the envelope map described below;",
        "- `signer` is the producing identity (`scheduler`, `node-agent.<node_id>`, ...), the same name as "
        "its NATS user and its certificate's SAN;",
        "- `ed25519_signature` is the Ed25519 signature of exactly `envelope_bytes` by the signer's "
        "signing key, whose certificate is issued by the qvm CA and found in the trust bundle. Signing the "
        "bytes as sent avoids any canonicalisation question.",
        "",
        f"A message may be at most {MAX_MESSAGE_BYTES} bytes. The JetStream `Nats-Msg-Id` header is the "
        "envelope `id`, so a republished event is stored once; the envelope's `trace` entries are also sent "
        "as headers (W3C trace context).",
        "",
        "Before any handler sees a message, the consumer checks, in this order: size, outer shape, wire "
        "version, known signer, signature, envelope schema, signer == `producer`, known type and schema "
        "version, producer role allowed for the type, node-agents only for their own node, payload schema, "
        "and that the subject is the catalogue's subject for the envelope's ids. A message failing any "
        "check is dead-lettered (see [Dead letters](#dead-letters)).",
        "",
        "### Envelope",
        "",
        *_field_table(Envelope),
        "",
        "`payload` holds the event's payload map, validated against the schema of `type` at version `v` "
        "(the payload tables below). `job_id` and `node_id` fill the placeholders of the subject template.",
        "",
    ]


def _streams() -> list[str]:
    rows = [[_code(s.name), ", ".join(_code(x) for x in s.subjects), s.description] for s in STREAMS.values()]
    return [
        "## Streams",
        "",
        "One JetStream stream per lifecycle domain (file storage, limits retention; replicas, maximum age "
        "and duplicate window come from the `QVM_STREAM_*`, `QVM_DEAD_LETTER_MAX_AGE_S` and "
        "`QVM_DUPLICATE_WINDOW_S` settings).",
        "",
        *_table(("Stream", "Subjects", "Description"), rows),
        "",
    ]


def _index() -> list[str]:
    rows = [
        [_code(s.type.value), _code(s.subject), _code(STREAMS[s.domain].name), _roles(s.producers),
         _roles(consumers_of(s.type))]
        for s in CATALOGUE.values()
    ]
    return [
        "## Event index",
        "",
        "Subject placeholders: `{job_id}` and `{node_id}` are the envelope's ids; `{producer}` is the "
        "producing identity. A `node-agent` may only publish with its own node id in the subject, which "
        "the NATS server enforces.",
        "",
        *_table(("Type", "Subject", "Stream", "Producers", "Consumers"), rows),
        "",
    ]


def _payload_model(spec: EventSpec) -> type[BaseModel]:
    # `EventSpec.payload` is annotated `type[Frozen]` inside a dataclass whose field `type` shadows the
    # builtin, which mypy cannot resolve; state the real type here.
    return cast("type[BaseModel]", spec.payload)


def _event(spec: EventSpec) -> list[str]:
    model = _payload_model(spec)
    own_doc = model.model_json_schema().get("description")
    lines = [
        f"### `{spec.type.value}`",
        "",
        spec.description,
        "",
    ]
    if own_doc:
        lines += [" ".join(str(own_doc).split()), ""]
    lines += [
        f"- **Subject:** {_code(spec.subject)}",
        f"- **Stream:** {_code(STREAMS[spec.domain].name)}",
        f"- **Producers:** {_roles(spec.producers)}",
        f"- **Consumers:** {_roles(consumers_of(spec.type))}",
        f"- **Schema version:** {spec.version}",
        f"- **Payload model:** {_code(model.__name__)}",
    ]
    if spec.node_scoped:
        lines.append("- **Node-scoped:** the subject carries the producing node's id; a node-agent can only "
                     "publish it for its own node.")
    return [*lines, "", *_field_table(model), ""]


def _events() -> list[str]:
    out = ["## Events", ""]
    for spec in CATALOGUE.values():
        out += _event(spec)
    return out


def _consumer_rows(c: ConsumerSpec) -> list[str]:
    ident = Identity(c.role, _NODE_PLACEHOLDER if c.role is Role.NODE_AGENT else None)

    def fill(text: str) -> str:
        return text.replace(_NODE_PLACEHOLDER, "{node_id}")

    backoff = ", ".join(f"{b:g}" for b in c.backoff_s)
    durables = c.durables(ident)
    return [
        "<br>".join(_code(fill(d.name)) for d in durables),
        _code(c.role.value),
        _code(c.stream),
        "<br>".join(_code(fill(f)) for d in durables for f in d.filters),
        ", ".join(_code(e.value) for e in c.events),
        f"max {c.max_deliver} deliveries; ack wait {c.ack_wait_s:g} s; backoff {backoff} s",
        c.description,
    ]


def _consumers() -> list[str]:
    return [
        "## Consumers",
        "",
        "Every durable pull consumer is declared in `shared/consumers.py`. A service's consumer spec is one "
        "durable, `<identity token>-<key>`, with all its filters (its events keep their stream order); the "
        "operator makes it when provisioning, and the service may only pull, ack and read its info. All "
        "replicas of a service share it, so work is spread across them. A node-agent's spec becomes one durable "
        "per event, `<identity token>-<key>[-<event>]` (dots replaced by `_`), with one filter carrying the node "
        "id, which the agent creates itself through the one subject its permissions name "
        "(`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`): it cannot create another's consumer or widen a "
        "filter. A failing "
        "handler is retried with the listed backoff; after the last delivery the message is dead-lettered "
        "with reason `handler_failed`.",
        "",
        *_table(
            ("Durables", "Role", "Stream", "Filters", "Events", "Delivery", "Description"),
            (_consumer_rows(c) for c in CONSUMERS),
        ),
        "",
        "### Stream readers",
        "",
        "Identities that fold a stream's history read it with batched message gets "
        "(`$JS.API.DIRECT.GET.<stream>`, `shared/reader.py`), which create no consumer on the server. "
        "Nobody but the operator may create an unnamed (ephemeral or ordered) consumer on an event stream.",
        "",
        *_table(("Role", "Stream", "Why"), ([_code(r.role.value), _code(r.stream), r.why] for r in READERS)),
        "",
    ]


def _dead_letters() -> list[str]:
    raw = DEAD_LETTER_SUBJECT
    rejected = CATALOGUE[EventType.EVENT_REJECTED]
    return [
        "## Dead letters",
        "",
        "A message that fails a check, or whose handler keeps failing, is never dropped and never loops: the "
        "consumer that refused it",
        "",
        f"1. stores the raw message unchanged on {_code(raw)} (stream {_code(STREAMS[Domain.DEAD].name)}, "
        "`{producer}` being the consumer's own identity and `{consumer}` its durable: the server lets an "
        "identity publish dead letters only under its own durables' names) with the headers `Qvm-Reason`, "
        "`Qvm-Detail`, `Qvm-Subject`, `Qvm-Stream-Seq` and `Qvm-Consumer` (it is not an envelope, so it is "
        "not a catalogue entry);",
        f"2. publishes a signed {_code(rejected.type.value)} report on {_code(rejected.subject)};",
        "3. acks the original. If storing the dead letter fails, the original stays un-acked and is "
        "redelivered later.",
        "",
        "The signed report is what proves a raw copy's origin: `qvm audit replay` flags a raw dead letter "
        "without a matching report (same identity, consumer, stream sequence and subject).",
        "",
        "Reasons (the `Qvm-Reason` header and the `reason` field of `event.rejected`): "
        + ", ".join(_code(r.value) for r in Reason)
        + ".",
        "",
    ]


def render_events_markdown() -> str:
    """The full event reference as Markdown; deterministic for a given code base."""
    lines = [*_intro(), *_streams(), *_index(), *_events(), *_consumers(), *_dead_letters()]
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(render_events_markdown())


if __name__ == "__main__":
    main()
