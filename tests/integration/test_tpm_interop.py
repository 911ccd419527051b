"""qvm and tpm2-tools agree on quotes, against a real (software) TPM.

(a) a quote made entirely by tpm2-tools (tpm2_createek, tpm2_createak, tpm2_quote) passes
    `qvm attest check-quote`, with the AK as TPM2B_PUBLIC or PEM and the PCRs in either tpm2-tools format,
    and a wrong nonce or PCR value fails it;
(b) a quote made by qvm's node-agent code (TpmDevice) and written out by `qvm attest export` passes
    `tpm2_checkquote`, and one flipped byte fails both tpm2_checkquote and qvm.

swtpm has no resource manager: the TSS in this process (ESAPI) and the tools must take turns on its one
connection, and every tool's transient objects are flushed after it (swtpm holds three at most).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca", "tpm2_createek", "tpm2_createak", "tpm2_readpublic", "tpm2_quote",
         "tpm2_checkquote", "tpm2_pcrextend", "tpm2_flushcontext")
if missing := [t for t in TOOLS if shutil.which(t) is None]:
    pytest.skip(f"needs swtpm and tpm2-tools ({', '.join(missing)} missing)", allow_module_level=True)
pytest.importorskip("tpm2_pytss")

from typer.testing import CliRunner  # noqa: E402

from shared.cli.main import app  # noqa: E402
from shared.tpm.device import TpmDevice  # noqa: E402
from shared.tpm.measurements import AgentMeasurement, entry_digest  # noqa: E402
from shared.tpm.quote import binding  # noqa: E402
from shared.tpm.structures import parse_public  # noqa: E402
from shared.tpm.swtpm import Swtpm, SwtpmState  # noqa: E402

NONCE = "00112233445566778899aabbccddeeff"


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    swtpm = Swtpm(SwtpmState(tmp_path_factory.mktemp("swtpm"))).start()
    try:
        yield swtpm
    finally:
        swtpm.stop()


def tool(tpm: Swtpm, cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti, "TSS2_LOG": "all+NONE"}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
    subprocess.run(["tpm2_flushcontext", "-t"], cwd=cwd, env=env, capture_output=True, timeout=30)
    return proc


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{proc.args}: {proc.stdout}{proc.stderr}"
    return proc


def qvm(*args: str | Path) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["attest", *map(str, args)])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tools_quote(tpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EK, AK under it and a quote over sha256 PCRs 0, 1 and 16, all by tpm2-tools."""
    d = tmp_path_factory.mktemp("tools")
    ok(tool(tpm, d, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"))
    ok(tool(tpm, d, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa",
            "-u", "ak.pub", "-n", "ak.name"))
    ok(tool(tpm, d, "tpm2_readpublic", "-c", "ak.ctx", "-f", "pem", "-o", "ak.pem"))
    ok(tool(tpm, d, "tpm2_pcrextend", "16:sha256=" + "ab" * 32))
    ok(tool(tpm, d, "tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,1,16", "-q", NONCE, "-g", "sha256",
            "-m", "quote.msg", "-s", "quote.sig", "-o", "pcrs.bin"))
    ok(tool(tpm, d, "tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,1,16", "-q", NONCE, "-g", "sha256",
            "-m", "quote2.msg", "-s", "quote2.sig", "-o", "pcrs.values", "-F", "values"))
    return d


def test_tools_quote_passes_qvm_check_quote(tools_quote: Path) -> None:
    d = tools_quote
    assert parse_public((d / "ak.pub").read_bytes()).name == (d / "ak.name").read_bytes()
    for ak in ("ak.pub", "ak.pem"):
        code, out = qvm("check-quote", "-u", d / ak, "-m", d / "quote.msg", "-s", d / "quote.sig",
                        "-f", d / "pcrs.bin", "-g", "sha256", "-q", NONCE)
        assert code == 0, out
        assert "valid quote" in out and "sha256:0,1,16" in out
    code, out = qvm("check-quote", "-u", d / "ak.pub", "-m", d / "quote2.msg", "-s", d / "quote2.sig",
                    "-f", d / "pcrs.values", "-l", "sha256:0,1,16", "-q", NONCE)
    assert code == 0, out


def test_tools_quote_with_wrong_nonce_or_pcrs_fails_qvm(tools_quote: Path, tmp_path: Path) -> None:
    d = tools_quote
    args: list[str | Path] = ["-u", d / "ak.pub", "-m", d / "quote.msg", "-s", d / "quote.sig"]
    code, out = qvm("check-quote", *args, "-f", d / "pcrs.bin", "-q", NONCE[:-2] + "00")
    assert code == 1 and "invalid quote: nonce_mismatch" in out, out
    code, out = qvm("check-quote", *args, "-f", d / "pcrs.bin")  # no -q: the quote must carry no extraData
    assert code == 1 and "nonce_mismatch" in out, out
    pcrs = bytearray((d / "pcrs.bin").read_bytes())
    pcrs[142] ^= 1  # PCR 0's first byte: 132-byte selection, u32 list count, u32 digest count, u16 size
    (tmp_path / "pcrs.bin").write_bytes(bytes(pcrs))
    code, out = qvm("check-quote", *args, "-f", tmp_path / "pcrs.bin", "-q", NONCE)
    assert code == 1 and "pcr_digest_mismatch" in out, out
    code, out = qvm("check-quote", *args, "-f", tmp_path / "absent.bin", "-q", NONCE)
    assert code == 2 and "cannot read PCR file" in out and "Traceback" not in out, out


def test_qvm_quote_exported_passes_tpm2_checkquote(tpm: Swtpm, tmp_path: Path, tools_quote: Path) -> None:
    """tools_quote first: the tools' objects are flushed and the tools' quote is taken before ESAPI connects."""
    entry = AgentMeasurement(node_id="interop", agent_version="1", agent_sha256="a" * 64, config_sha256="b" * 64)
    key = hashlib.sha256(b"node signing key").digest()
    device = TpmDevice(tpm.tcti)
    try:
        device.load_keys()
        before = device.read_pcrs([15])[15]
        device.extend(15, entry_digest(entry))
        quote = device.quote([15, 16], binding(bytes.fromhex(NONCE), key))
        ak_public = device.ak_public
    finally:
        device.close()  # the tools need the connection
    evidence = {
        "challenge_id": "0" * 32, "purpose": "node", "ak_public": ak_public.hex(), "attest": quote.attest.hex(),
        "signature": quote.signature.hex(), "pcrs": {str(i): v.hex() for i, v in quote.pcrs.items()},
        "log": [entry.model_dump(mode="json")], "nonce": NONCE, "key": key.hex(),
    }
    (tmp_path / "evidence.json").write_text(json.dumps(evidence))
    out_dir = tmp_path / "export"
    code, out = qvm("export", tmp_path / "evidence.json", "--dir", out_dir)
    assert code == 0, out
    assert sorted(p.name for p in out_dir.iterdir()) == ["ak.pub", "pcrs.bin", "quote.msg", "quote.sig"]
    command = next(line for line in out.splitlines() if line.startswith("tpm2_checkquote"))
    assert f"-q {binding(bytes.fromhex(NONCE), key).hex()}" in command
    ok(subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30))

    files: list[str | Path] = ["-u", out_dir / "ak.pub", "-m", out_dir / "quote.msg", "-s", out_dir / "quote.sig",
             "-f", out_dir / "pcrs.bin", "-q", binding(bytes.fromhex(NONCE), key).hex()]
    code, out = qvm("check-quote", *files)
    assert code == 0, out

    code, out = qvm("show", tmp_path / "evidence.json")
    assert code == 0, out
    for expected in ("TPM_GENERATED", "ecdsa with sha256", "interop", "valid quote"):
        assert expected in out, out
    assert ("matches PCR 15" in out) == (before == bytes(32)), out

    msg = bytearray((out_dir / "quote.msg").read_bytes())
    msg[len(msg) // 2] ^= 0x01
    (out_dir / "quote.msg").write_bytes(bytes(msg))
    assert subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30).returncode != 0
    code, out = qvm("check-quote", *files)
    assert code == 1 and "invalid quote: signature_invalid" in out, out
