"""The one way events are encoded and decoded: msgpack envelope, Ed25519 signature, catalogue checks.

Wire format (msgpack): `[1, envelope_bytes, signer_identity, signature]` where `envelope_bytes` is the
msgpack map of an `Envelope` and `signature = Ed25519(signer_key, envelope_bytes)`. Signing the exact
bytes avoids any canonicalisation question. Node-agents append a fifth element, their signing certificate
(DER): nodes join while the platform runs, and the CA's signature on it is how every reader knows their key.

`decode` runs every check before a handler may see the event, in this order: size, outer shape, wire
version, known signer, signature, envelope schema, signer == producer, known type and schema version,
producer role allowed for the type, node-agents only for their own node, payload schema, subject ==
the catalogue's subject for those ids. Any failure raises `RejectedEvent` with a stable `Reason`.

Schemas are checked strictly (`validate_wire`): on the wire a type is what msgpack decoded, never a
coercion (`true` is not 1, `"7"` is not 7, `1.0` is not an int field's 1, `"1"` is not a bool).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import SchemaValidator
from pydantic_core import core_schema as cs

from shared.errors import PkiError, Reason, RejectedEvent
from shared.events import EventSpec, payload_field_node, spec_for, spec_of_payload, subject_for
from shared.identity import ID_PATTERN, NODE_ID_PATTERN, Identity, Role, valid_id
from shared.ids import new_event_id
from shared.models import Frozen
from shared.pki import Signer, TrustBundle

__all__ = ["MAX_MESSAGE_BYTES", "WIRE_VERSION", "Codec", "Envelope", "Event", "Outgoing", "validate_wire"]

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
_NODE_RE = re.compile(NODE_ID_PATTERN)
_UUID7 = r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


class Envelope(Frozen):
    """What every event carries besides its payload; signed as a whole."""

    id: str = Field(pattern=_UUID7, description="UUIDv7, also the Nats-Msg-Id.")
    type: str = Field(max_length=64)
    v: int = Field(ge=1, le=1000, description="Schema version of the payload.")
    time_ns: int = Field(ge=0)
    producer: str = Field(max_length=128)
    job_id: str | None = Field(None, pattern=ID_PATTERN)
    node_id: str | None = Field(None, pattern=NODE_ID_PATTERN)
    instance_id: str | None = Field(None, pattern=ID_PATTERN)
    trace: dict[str, str] = Field(default_factory=dict, max_length=8)
    payload: dict[str, Any]

    @field_validator("trace")
    @classmethod
    def _small_trace(cls, v: dict[str, str]) -> dict[str, str]:
        if any(len(k) > 64 or len(val) > 512 for k, val in v.items()):
            raise ValueError("trace context too large")
        return v


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded, verified event."""

    envelope: Envelope
    payload: Frozen
    spec: EventSpec
    subject: str
    stream_seq: int = 0  # set by the consumer that received it (tells a redelivery from a replay)
    deliveries: int = 1  # how many times the consumer has been handed it (JetStream's count), this one included

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def job_id(self) -> str | None:
        return self.envelope.job_id

    @property
    def node_id(self) -> str | None:
        return self.envelope.node_id


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    data: bytes
    event_id: str
    envelope: Envelope


class Codec:
    """Encode as `signer`; decode and verify against `trust`."""

    def __init__(self, signer: Signer | None, trust: TrustBundle) -> None:
        self.signer = signer
        self.trust = trust

    # ------------------------------------------------------------ encode
    def encode(
        self,
        payload: Frozen,
        *,
        job_id: str | None = None,
        node_id: str | None = None,
        instance_id: str | None = None,
        event_id: str | None = None,
        trace: dict[str, str] | None = None,
        time_ns: int | None = None,
    ) -> Outgoing:
        if self.signer is None:
            raise RuntimeError("this codec has no signing key")
        spec = spec_of_payload(payload)
        producer = str(self.signer.identity)
        if self.signer.identity.node_id is not None:
            node_id = self.signer.identity.node_id  # a node-agent only ever speaks for its own node
        for value in (job_id, instance_id):
            if value is not None and not valid_id(value):
                raise ValueError(f"invalid id {value[:80]!r}")
        if node_id is not None and not _NODE_RE.fullmatch(node_id):
            raise ValueError(f"invalid node id {node_id[:80]!r}")
        # Every value here is ours and already typed: build the envelope without re-validating it.
        fields = {
            "id": event_id or new_event_id(), "type": spec.type.value, "v": spec.version,
            "time_ns": time_ns if time_ns is not None else time.time_ns(), "producer": producer,
            "job_id": job_id, "node_id": node_id, "instance_id": instance_id, "trace": trace or {},
            "payload": payload.model_dump(mode="json"),
        }
        envelope = Envelope.model_construct(**fields)  # type: ignore[arg-type]
        subject = subject_for(spec, job_id=job_id, node_id=node_id, producer=producer)
        env_bytes = msgpack.packb(fields, use_bin_type=True)
        wire = [WIRE_VERSION, env_bytes, producer, self.signer.sign(env_bytes)]
        if self.signer.certificate is not None:
            wire.append(self.signer.certificate)
        data = msgpack.packb(wire, use_bin_type=True)
        return Outgoing(subject, data, envelope.id, envelope)

    # ------------------------------------------------------------ decode
    def decode(self, subject: str, data: bytes) -> Event:
        if len(data) > MAX_MESSAGE_BYTES:
            raise RejectedEvent(Reason.TOO_LARGE, f"{len(data)} bytes")
        outer = _unpack(data)
        if not (isinstance(outer, list) and len(outer) in (4, 5)):
            raise RejectedEvent(Reason.MALFORMED, "wire message is not a 4- or 5-element array")
        version, env_bytes, signer, signature = outer[:4]
        certificate = outer[4] if len(outer) == 5 else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise RejectedEvent(Reason.MALFORMED, "wire version is not an integer")
        if version != WIRE_VERSION:
            raise RejectedEvent(Reason.UNSUPPORTED_VERSION, f"wire version {version}")
        if not (isinstance(env_bytes, bytes) and isinstance(signer, str) and isinstance(signature, bytes)
                and (certificate is None or isinstance(certificate, bytes))):
            raise RejectedEvent(Reason.MALFORMED, "wire fields have the wrong types")
        key: Ed25519PublicKey | None
        if certificate is not None:
            try:
                key = self.trust.key_from(signer, certificate)
            except PkiError as exc:
                raise RejectedEvent(Reason.UNKNOWN_SIGNER, f"signer {signer[:128]!r}: {exc}") from None
        else:
            key = self.trust.key_for(signer)
        if key is None:
            raise RejectedEvent(Reason.UNKNOWN_SIGNER, f"signer {signer[:128]!r} is not in the trust bundle")
        try:
            key.verify(signature, env_bytes)
        except InvalidSignature:
            raise RejectedEvent(Reason.BAD_SIGNATURE, f"signature by {signer} does not verify") from None
        raw = _unpack(env_bytes)
        if not isinstance(raw, dict):
            raise RejectedEvent(Reason.MALFORMED, "envelope is not a map")
        try:
            envelope = validate_wire(Envelope, raw)
        except ValidationError as exc:
            raise RejectedEvent(Reason.SCHEMA_INVALID, _short(exc)) from None
        return self._check(subject, signer, envelope)

    def _check(self, subject: str, signer: str, envelope: Envelope) -> Event:
        if envelope.producer != signer:
            raise RejectedEvent(Reason.PRODUCER_NOT_ALLOWED, "producer differs from signer")
        spec = spec_for(envelope.type)
        if spec is None:
            raise RejectedEvent(Reason.UNKNOWN_TYPE, f"type {envelope.type!r} is not in the catalogue")
        if envelope.v != spec.version:
            raise RejectedEvent(Reason.UNSUPPORTED_VERSION, f"{spec.type} v{envelope.v}, expected v{spec.version}")
        ident = Identity.parse(signer)  # trust bundle only holds valid identities
        if ident.role not in spec.producers:
            raise RejectedEvent(Reason.PRODUCER_NOT_ALLOWED, f"{ident.role} may not emit {spec.type}")
        if ident.role is Role.NODE_AGENT and envelope.node_id != ident.node_id:
            raise RejectedEvent(Reason.PRODUCER_NOT_ALLOWED, f"{signer} may not speak for node {envelope.node_id}")
        try:
            payload = validate_wire(spec.payload, envelope.payload)
        except ValidationError as exc:
            raise RejectedEvent(Reason.SCHEMA_INVALID, _short(exc)) from None
        named = payload_field_node(payload)
        if named is not None and named != envelope.node_id:
            raise RejectedEvent(Reason.SUBJECT_MISMATCH, "payload node differs from envelope node")
        try:
            expected = subject_for(spec, job_id=envelope.job_id, node_id=envelope.node_id, producer=signer)
        except ValueError as exc:
            raise RejectedEvent(Reason.SCHEMA_INVALID, str(exc)) from None
        if expected != subject:
            raise RejectedEvent(Reason.SUBJECT_MISMATCH, f"published on {subject[:200]!r}, expected {expected!r}")
        return Event(envelope, payload, spec, subject)


# ---------------------------------------------------------------- strict wire validation

M = TypeVar("M", bound=BaseModel)
_WIRE: dict[type[BaseModel], SchemaValidator] = {}
_NOT_WALKED = frozenset({"metadata", "default", "serialization", "members", "cls", "expected"})
# A dict key the model types as int arrives as the decimal text `Codec.encode` wrote (JSON-mode dump);
# only that canonical form is read back, so "07", " 7", "7.0" or "7_0" never alias the key 7.
_INT_KEY = cs.chain_schema([cs.str_schema(pattern=r"^(0|-?[1-9][0-9]{0,18})$", strict=True),
                            cs.int_schema(strict=False)])


def validate_wire(model: type[M], data: Any) -> M:
    """Validate `data` decoded from msgpack (an event, a KV value) as `model`, strictly: every type exactly
    what msgpack produces for what `model_dump(mode="json")` wrote, never a lax coercion (a bool is no int,
    a numeric string no number, 1.0 no int field's 1, "1" no bool, bytes no str). The few forms that JSON
    mode maps are read back only in that form: an array for a tuple (or set), the value string (or int)
    for an enum, the canonical decimal string for an int dict key; an int for a float field, as in JSON.

    Python construction of the models (services, `qvm submit`'s YAML) stays as it is: the strict
    validator is derived from the model's core schema, not set in its config. Raises `ValidationError`."""
    validator = _WIRE.get(model)
    if validator is None:
        validator = _WIRE[model] = SchemaValidator(_strict(model.__pydantic_core_schema__), cs.CoreConfig(strict=True))
    result: M = validator.validate_python(data)
    return result


def _strict(node: Any) -> Any:
    """A copy of a core schema that validates strictly (with the config `strict=True`) except the wire forms
    above. Model nodes become their fields' schema plus a constructor: pydantic-core reuses a class's
    prebuilt (lax) validator for any model node, whatever its config says."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in _NOT_WALKED else _strict(v)) for k, v in node.items()}
    kind = out.get("type")
    wrapped: Any = None
    if kind == "model":
        config = out.get("config") or {}
        if out.get("post_init") or out.get("custom_init") or out.get("root_model") or \
                set(config) - {"title", "extra_fields_behavior"} or out["schema"].get("type") != "model-fields":
            raise TypeError(f"{out['cls'].__name__}: no strict wire validator for this kind of model")
        fields = {**out["schema"], "extra_behavior": config.get("extra_fields_behavior", "ignore")}
        wrapped = cs.no_info_after_validator_function(_constructor(out["cls"]), fields)
    elif kind == "enum":
        value_type = {"str": cs.str_schema(strict=True), "int": cs.int_schema(strict=True)}.get(out.get("sub_type", ""))
        if value_type is None:
            raise TypeError(f"{out['cls'].__name__}: only str and int enums have a wire form")
        inner = {k: v for k, v in out.items() if k != "ref"}
        wrapped = cs.chain_schema([value_type, {**inner, "strict": False}])
    elif kind in ("tuple", "set", "frozenset"):
        out.setdefault("strict", False)  # from a msgpack array (a list); the items stay strict
    elif kind == "dict" and (out.get("keys_schema") or {}).get("type") == "int":
        out["keys_schema"] = _INT_KEY
    if wrapped is None:
        return out
    if "ref" in out:  # definition references point at the node that replaces it
        wrapped["ref"] = out["ref"]
    return wrapped


def _constructor(cls: type[BaseModel]) -> Any:
    """Build an instance from the validated fields, as pydantic-core's model validator does."""
    new, put = object.__new__, object.__setattr__

    def build(validated: tuple[dict[str, Any], dict[str, Any] | None, set[str]]) -> BaseModel:
        values, extra, fields_set = validated
        instance = new(cls)
        put(instance, "__dict__", values)
        put(instance, "__pydantic_extra__", extra)
        put(instance, "__pydantic_fields_set__", fields_set)
        put(instance, "__pydantic_private__", None)
        return instance

    return build


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # untrusted bytes: every failure mode of the parser is a clean rejection
        raise RejectedEvent(Reason.MALFORMED, f"not msgpack ({type(exc).__name__})") from None


def _short(exc: ValidationError) -> str:
    errs = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errs[:3]]
    return "; ".join(parts)[:1000]
