"""Transient objects and sessions a dead process left in a TPM without a resource manager (swtpm here, like
`/dev/tpm0`): the next `TpmDevice` flushes them when the TPM is full, and only then (issue #14)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HT, TPM2_RC, TPM2_SE
from tpm2_pytss.types import TPM2B_PUBLIC

from shared.tpm.credential import make_credential
from shared.tpm.device import TpmDevice
from shared.tpm.structures import parse_public
from shared.tpm.swtpm import Swtpm


def _handles(tcti: str, kind: TPM2_HT) -> list[int]:
    esapi = ESAPI(tcti)
    try:
        _, data = esapi.get_capability(TPM2_CAP.HANDLES, kind << 24, 64)
        return [int(h) for h in data.data.handles]
    finally:
        esapi.close()  # closes the context only: nothing is flushed


def _leave_until_full(tcti: str, make: Callable[[ESAPI], object], full: int, what: str) -> int:
    """Like a killed process: `make` TPM objects or sessions until the TPM answers `full`, and drop the
    context unflushed. How many were made."""
    esapi = ESAPI(tcti)
    made = 0
    try:
        while True:
            try:
                make(esapi)
            except TSS2_Exception as exc:
                assert exc.error == full, exc
                return made
            made += 1
            assert made < 64, f"the TPM never ran out of {what}"
    finally:
        esapi.close()


def _leave_objects(tcti: str) -> int:
    return _leave_until_full(tcti, lambda e: e.create_primary(None, TPM2B_PUBLIC.parse("ecc256"),
                                                              primary_handle=ESYS_TR.OWNER),
                             TPM2_RC.OBJECT_MEMORY, "object memory")


def _leave_sessions(tcti: str) -> int:
    return _leave_until_full(tcti, lambda e: e.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None,
                                                                  TPM2_ALG.SHA256),
                             TPM2_RC.SESSION_MEMORY, "sessions")


def test_a_full_tpm_is_flushed_of_what_dead_processes_left(swtpm: Swtpm) -> None:
    # A killed agent: its EK and AK stay loaded.
    killed = TpmDevice(swtpm.tcti)
    killed.load_keys()
    killed.esapi.close()  # no flush, as after SIGKILL
    # Other dead processes filled what was left.
    _leave_objects(swtpm.tcti)
    stale = _handles(swtpm.tcti, TPM2_HT.TRANSIENT)
    assert len(stale) >= 3
    dev = TpmDevice(swtpm.tcti)
    try:
        dev.load_keys()
        assert dev.stale_flushed == len(stale)
        assert len(_handles(swtpm.tcti, TPM2_HT.TRANSIENT)) == 2  # this device's EK and AK only
        assert dev.ak_public == killed.ak_public  # the same keys, re-derived
        # Its sessions: a full session table is flushed too when activation needs one.
        assert _leave_sessions(swtpm.tcti) >= 1
        ek, ak = parse_public(dev.ek_public), parse_public(dev.ak_public)
        secret = os.urandom(32)
        blob, encrypted = make_credential(ek, ak.name, secret)
        assert dev.activate_credential(blob, encrypted) == secret
        assert dev.quote([15], b"n" * 32).attest  # its own keys survived every flush
    finally:
        dev.close()
    assert _handles(swtpm.tcti, TPM2_HT.TRANSIENT) == []


def test_an_agent_killed_with_sigkill_leaves_keys_the_next_one_flushes(swtpm: Swtpm) -> None:
    code = textwrap.dedent("""
        import sys, time
        from shared.tpm.device import TpmDevice
        dev = TpmDevice(sys.argv[1])
        dev.load_keys()
        print("loaded", flush=True)
        time.sleep(60)
    """)
    for _ in range(3):  # more than the TPM has room for, had nothing been flushed
        proc = subprocess.Popen([sys.executable, "-c", code, swtpm.tcti], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"loaded\n"
        finally:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
        assert len(_handles(swtpm.tcti, TPM2_HT.TRANSIENT)) == 2  # the killed one's EK and AK
    dev = TpmDevice(swtpm.tcti)
    try:
        dev.load_keys()
        assert dev.stale_flushed == 2
    finally:
        dev.close()


def test_nothing_is_flushed_while_there_is_room(swtpm: Swtpm) -> None:
    """Another user's object (a concurrent user of a shared development TPM) is left alone unless the TPM is
    full: flushing is the way out of a full TPM, not a habit."""
    esapi = ESAPI(swtpm.tcti)
    try:
        other, *_ = esapi.create_primary(None, TPM2B_PUBLIC.parse("ecc256"), primary_handle=ESYS_TR.OWNER)
        dev = TpmDevice(swtpm.tcti)
        try:
            dev.load_keys()
            assert dev.stale_flushed == 0
            assert esapi.read_public(other)  # still loaded
        finally:
            dev.close()
        esapi.flush_context(other)
    finally:
        esapi.close()
