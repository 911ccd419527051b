"""GPU confidential-computing evidence: the node's collection (against a fake NVML at the hardware boundary) and
the verifier's checks (services/attestation_verifier/gpu_cc.py) on NVIDIA's own sample evidence.

The sample is the one nv-local-gpu-verifier 2.7.3 (BSD-3-Clause, NVIDIA) ships for its "--test_no_gpu" mode
(verifier/samples/hopperAttestationReport.txt, hopperCertChain.txt): a real H100 report, signed by the GPU over
the nonce 931d8dd0... (not the 4cff7f53... that the package's no-GPU mode passes, which is why that mode fails its
own nonce check) with a 5-certificate chain to NVIDIA's Device Identity CA. NVIDIA's VBIOS RIM below is that
package's samples/1010_0200_882_96005E0001_test_no_gpu.swidtag (zlib, base64): a real NVIDIA-signed RIM, for
another VBIOS than the sample report's, whose signing certificate was valid until 2025-06-26.

No RIM for the sample report's driver 550.90.07 / VBIOS 96.00.9f.00.01 is shipped anywhere offline, so the
RIM comparison's positive case uses RIMs signed here by a test root (passed as `extra_rim_roots`), built from the
sample report's own measurements. The RIM tests need the gpu-cc extra (signxml, lxml) and skip without it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import pynvml
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.attestation_verifier.gpu_cc import (
    REASONS,
    GpuCcPolicy,
    GpuVerdict,
    parse_report,
    rim_ids,
    verify_gpu_evidence,
)
from services.node_agent.gpu.cc_evidence import collect_gpu_evidence
from shared.events import GpuEvidence
from tests.framework.fake_gpu import FakeNvml, FakeNvmlGpu

AT = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
AT_RIM = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)  # NVIDIA's sample RIM signer is valid 2023-06-27 .. 2025-06-26
STRICT = GpuCcPolicy()
NO_RIMS_OK = GpuCcPolicy(allow_rim_unavailable=True)

SAMPLE_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")

# NVIDIA's sample H100 attestation report (SPDM GET_MEASUREMENTS request + response), 4117 bytes.
SAMPLE_REPORT_HEX = (
    "11e001ff931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb001160000040c00d000101330001300000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000020133000130008048dfd18f"
    "e229bf16eb9d30cca0f11a24dafe6eb731de1462984645a0b189b77c4e4e17de727a5e19e3d07de51da33803013300013000164f445c3e28"
    "2ca8e4ab07c2179b8e02c8e3a2ceb83f9fae8dddaee70aa57207d87792d1481b46c02f9dba6e1fe1e77e0401330001300073bbf35822549e"
    "28ba8fb2671fb7b58f46424a0069205b3ecf1d0fa762adef90b538cc9d692eb5c050147f2f1e8214ab05013300013000568b89291a34cece"
    "03b12aaa352d9afe273610307525b8443e90faa78d82ecfa9c7827d8f7915c35b2fab972e108668606013300013000c9e4fe668e9dc269a4"
    "657146b5e28a22347cde18a4b0e79d8146532f27ebc386f304400ea5d4bf4159b5a6916dd4564e070133000130006850b0a82e7e77c0f51e"
    "0e6732163866003390c4eb286d8dfb26a72f711a9c8bcdf402a1fd4e5d70b97708107a785efc0801330001300080161aac5e7509f038a645"
    "7b111e048207d1dc0e78edbb8c172fca4139c1d5f29cda67ecdd261fdc9203b76387f7389f09013300013000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000a013300013000059b32e712a153f490dbfb7976"
    "a9e275d789e28bd4803c357def2b6123327c430526bfaecc200f496d4e149fc5eade030b0133000130000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000c013300013000413d008cedd5526a79455a17815432"
    "8ce960af252bdb06e7fe4080049add412488cac39ecf3d80efbdc6bdd3638617730d01330001300000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000e0133000130000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000f013300013000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000001001330001300000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000110133000130000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000012013300013000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000001301330001300000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000140133000130000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000015013300013000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000001601330001300068454d4bb5545a74e478e288469a6548bb4d4aa8556a512f9d"
    "dd41b0337a602b3f050a469578139c6cea0e0f7c9861c817013300013000cf98e425ebfb0c20532162d772d5b355bbabc68b0876a3c91a67"
    "6769a3d6e8460e01be987669f8196ec63b7b6a8d858118013300013000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000001901330001300000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000001a013300013000b718948c035092ebd0c7d6f069141e6bd0cd40d8ddd436aa0d1a705afe"
    "dfe67c12891d239e6ddf30ea09775d1056ac1a1b0133000130006dbc7f8e23ac6f69c4bf3cb4c61566d7957fce2f0f16a499ac1f724bacb0"
    "935eefa5be16f548ba5141449f43555f240c1c0133000130002191a06d9fad030cb8a707391f2e51838d8ca1e17109325b155f774ddcb2bf"
    "704ca023ba711a282c93a1afcd590ce20b1d0133000130000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000001e0133000130001d040fdc3c8de3d8afbcebb79bf3a9ec09a277651b7ace16627f6201c90414d991"
    "7b57a7bd67482b1929c9ec0bd1a15d1f0133000130001bd45c8a34c33ac6a316050cb0752aa648ac4c6cd26af165cec416557468d21f7a61"
    "b6c5c7c4ea6d131be9270659393920013300013000a0d52c35704f13bf52745f27f16285292a7d8e9b8011320c18a58effd1a7934abb414e"
    "f99809ec9852568552904d361e210133000130009f976e82fa30fcc6f82bce2c942ad4707c3df6b76e6295ce4c95cf9bb62a08392571e9fb"
    "787f19b31bf0f3f04ba887a622013300013000198b81d9c0cefe0b33ad65de3fad238a5461d8ee32487bf70fc1926041408cb114624b8ca6"
    "b0d5fc97028b58d9cdb78d2301330001300007bbc504d3327cb76d4c4f3b3f1daf8779e40cc31d60826cb11dcc5d09dc59a83bf693f0fb9b"
    "1f0b5e58ed4cdc3a580f24013300013000c0962ed90316ecea959dd0b6632d0c4f4d3bfbf72c4cd9031efe48154ed9ca59b41cd20ce06a7f"
    "9ca5cd8b0687cf12582501330001300010570f642e274cfc2b9f1c955fab0aa56b6193d5c5ea271a74eb9764334865695921456dc1ca383d"
    "7edf9e67760937ca26013300013000fccd6efa76267f5b43fc4a7647ce843a3912f0944a9bcc907456408c368ad5e85bec4512d9d9aedeba"
    "b31c3b8095062727013300013000c7ea135dca389918789454861bb593095dc44f8ad39035665daa81fa02cf6fbd3a18227b6224dced7028"
    "8b9fd3161cc0280133000130005d7a8a08deeeeef3df07828dafeb112bd2372504d324eff2f4eb43893315fe331428c9afbc52fcc06159d4"
    "06f0ca90af290133000130009d2c6389c070dde430ffd510cad0c546fb9a73b9ee7a478fa804d2ab14c674487abdc7aa12d90215ced4f367"
    "8f2765fa2a013300013000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000002b01330001300000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00002c0133000130000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "002d013300013000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "2e0133000130000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000002f"
    "0133000130000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000003001"
    "3300013000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000310133"
    "0001300000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000032013300"
    "0130000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000003301330001"
    "3000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000340133000130"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000035013300013000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000003601330001300000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000370133000130000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000038013300013000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000003901330001300000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000003a0133000130000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000003b013300013000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000003c01330001300000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000003d0133000130000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000000000000000000003e013300013000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000003f01330001300000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000400133000130000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000b4b8a06aaaa35542839388e159d447a5d6f619"
    "4998fd86513e2d591ccf640985a60106000800009f0096010000000e000400b10300000f0009003838320000000000001000050030000000"
    "0011000500313031300012000500303230300013000200000003000a003535302e39302e3037000400080080010000000000000c00000100"
    "0000000100000004000000010000000100000001000000010000000100000000000000010000000000000082000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000200000002000000000000000000000001000000010000000100000000"
    "0000000100000001000000010000000100000001000000020000000100000001000000010000000100000001000000010000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000000000000000000d00040000c001000b0001005514003000f5c384aebb579217"
    "a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d150001005590d679ad2c04147eb31f4a"
    "99ff8f4f8ad1bce8f750e1bb75f266506c88a84150e8671ed5513b7718f5808e5b222661b21aa90dae6c655e652959c8046b5f81feb7b00d"
    "b3fe1ae97e81d50b02ec9cc64c96f8d0dd5f3be286f82eb98fe07e67d0"
)

# Its device certificate chain as NVML returns it (leaf first, NVIDIA Device Identity CA last).
SAMPLE_CHAIN_PEM = """-----BEGIN CERTIFICATE-----
MIIDfTCCAwKgAwIBAgIUU8IroV5daAiCgtoHTtn7N6pYV3EwCgYIKoZIzj0EAwMw
ZDEbMBkGA1UEBRMSNDE0MzFENDgwRkU1RTg3Mjc0MQswCQYDVQQGEwJVUzEbMBkG
A1UECgwSTlZJRElBIENvcnBvcmF0aW9uMRswGQYDVQQDDBJHSDEwMCBBMDEgR1NQ
IEJST00wIBcNMjAxMDE3MDAwMDAwWhgPOTk5OTEyMzEyMzU5NTlaMHwxMTAvBgNV
BAUTKDUzQzIyQkExNUU1RDY4MDg4MjgyREEwNzRFRDlGQjM3QUE1ODU3NzExCzAJ
BgNVBAYTAlVTMRswGQYDVQQKDBJOVklESUEgQ29ycG9yYXRpb24xHTAbBgNVBAMM
FEdIMTAwIEEwMSBHU1AgRk1DIExGMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEgDPx
q23XZIuWevUXqLFHMD7bTiPOocq/1+RPjdVkBDxIlQpP2AjxfBSIYYcCN55G0vjO
UFeFv8cx4NJSoCYyPWK/EvFNdyy3RNv00pdWU3ZAQmGOcorOJ+eUnWR/6Wjto4IB
WTCCAVUwDgYDVR0PAQH/BAQDAgeAMB0GA1UdDgQWBBTTwiuhXl1oCIKC2gdO2fs3
qlhXcTAfBgNVHSMEGDAWgBTPzHFrUzj0etDtUvSant7I+soqTzA4BgNVHREEMTAv
oC0GCisGAQQBgxyCEgGgHwwdTlZJRElBOkdIMTAwOjQ4QjAyRDkyNDk0QkFERjQw
gcgGBmeBBQUEAQSBvTCBugIBATB2MBAGByqGSM49AgEGBSuBBAAiA2IABE9Q2m4E
enmB6sPZ4qh+gs85UTtdyS+/GuP5v+8IW5KaDhKJSMFQAumGGCpY1gS16l5C/p5H
7i21IYxsxrUedEtgfcdse7hYDNoE2yexPpSbzTB6WSeKiTjnrbexkGdvlzA9Bglg
hkgBZQMEAgIEMPXDhK67V5IXosZrF+0PKOapuNY5BBrNe0chzsAE9ydUlLqUu1zf
2zBV7gUXYrH3XTAKBggqhkjOPQQDAwNpADBmAjEA7ooRPcqt9nC1Yo+zRV2NG2cP
kG2mt2xVrp7KvoF7xs1mpXbGSo4Ye4bgcYOWJ/CEAjEArMWN40TlJ1DuDKV1jw10
xoRzSZuvnn41eav2pKu0Pkoa2Cdy5Sk9lv0fIB1vsKAf
-----END CERTIFICATE-----
-----BEGIN CERTIFICATE-----
MIICUDCCAdagAwIBAgIJQUMdSA/l6HJ0MAoGCCqGSM49BAMDMFMxJzAlBgNVBAMM
Hk5WSURJQSBHSDEwMCBQcm92aXNpb25lciBJQ0EgMTEbMBkGA1UECgwSTlZJRElB
IENvcnBvcmF0aW9uMQswCQYDVQQGEwJVUzAgFw0yMDEwMTcwMDAwMDBaGA85OTk5
MTIzMTIzNTk1OVowZDEbMBkGA1UEBRMSNDE0MzFENDgwRkU1RTg3Mjc0MQswCQYD
VQQGEwJVUzEbMBkGA1UECgwSTlZJRElBIENvcnBvcmF0aW9uMRswGQYDVQQDDBJH
SDEwMCBBMDEgR1NQIEJST00wdjAQBgcqhkjOPQIBBgUrgQQAIgNiAARPUNpuBHp5
gerD2eKofoLPOVE7Xckvvxrj+b/vCFuSmg4SiUjBUALphhgqWNYEtepeQv6eR+4t
tSGMbMa1HnRLYH3HbHu4WAzaBNsnsT6Um80welkniok45623sZBnb5ejYzBhMA8G
A1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgIEMB0GA1UdDgQWBBTPzHFrUzj0
etDtUvSant7I+soqTzAfBgNVHSMEGDAWgBQpaMsWLNB3lXKieRAD5p66DMwKlDAK
BggqhkjOPQQDAwNoADBlAjEArfqR6WTTScWTej2Ib/Ow0WZDty+pLP8kYmmf8H7a
txQabkBkYrd6sqJfw+YSM9RKAjAbl2SG6I0fQ+mbpFMX4bFf7JF0V2ln5phOBGLi
0qmpbZ5H3cZkuK1g3xxda6ru4PE=
-----END CERTIFICATE-----
-----BEGIN CERTIFICATE-----
MIICqjCCAi+gAwIBAgIQav5xhPkiMsjfeyQiYXduVjAKBggqhkjOPQQDAzA9MR4w
HAYDVQQDDBVOVklESUEgR0gxMDAgSWRlbnRpdHkxGzAZBgNVBAoMEk5WSURJQSBD
b3Jwb3JhdGlvbjAgFw0yMjAzMDEwMDAwMDBaGA85OTk5MTIzMTIzNTk1OVowUzEn
MCUGA1UEAwweTlZJRElBIEdIMTAwIFByb3Zpc2lvbmVyIElDQSAxMRswGQYDVQQK
DBJOVklESUEgQ29ycG9yYXRpb24xCzAJBgNVBAYTAlVTMHYwEAYHKoZIzj0CAQYF
K4EEACIDYgAEzUdWqjn1OlXhLfFOKAFTghqG+Q3zF4xgSBbZsUEyWYCC3rKjE9Nn
o88ZpBQx85Oo0PkqP2dwoMVNTQMv5cvy9jLaTvSTXZwN2HQHE9u7x7BIYrWi0sG3
5q1IJNSOGO5Lo4HbMIHYMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEG
MDwGA1UdHwQ1MDMwMaAvoC2GK2h0dHA6Ly9jcmwubmRpcy5udmlkaWEuY29tL2Ny
bC9sMi1naDEwMC5jcmwwNwYIKwYBBQUHAQEEKzApMCcGCCsGAQUFBzABhhtodHRw
Oi8vb2NzcC5uZGlzLm52aWRpYS5jb20wHQYDVR0OBBYEFCloyxYs0HeVcqJ5EAPm
nroMzAqUMB8GA1UdIwQYMBaAFAdCoOsDnIBge6FBYZlNriX3wpseMAoGCCqGSM49
BAMDA2kAMGYCMQDK0BCr49DNJ48Yh5wu388bZifDFxAsiUS4U1fGmpJZFhCbODH6
mRwcMxp6EOayZuYCMQDYKTyNc2FxWFuhHtdCE3ls4S7SInehdErTZNuhFymc4YOM
6VlLWTY/CM+resjjqxQ=
-----END CERTIFICATE-----
-----BEGIN CERTIFICATE-----
MIICijCCAhCgAwIBAgIQTCVe3jvQAb8/SjtgX8qJijAKBggqhkjOPQQDAzA1MSIw
IAYDVQQDDBlOVklESUEgRGV2aWNlIElkZW50aXR5IENBMQ8wDQYDVQQKDAZOVklE
SUEwIBcNMjIwMTEyMDAwMDAwWhgPOTk5OTEyMzEyMzU5NTlaMD0xHjAcBgNVBAMM
FU5WSURJQSBHSDEwMCBJZGVudGl0eTEbMBkGA1UECgwSTlZJRElBIENvcnBvcmF0
aW9uMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE+pg+tDUuILlZILk5wg22YEJ9Oh6c
yPcsv3IvgRWcV4LeZK1pTCoQDIplZ0E4qsLG3G04pxsbMhxbqkiz9pqlTV2rtuVg
SmIqnSYkU1jWXsPS9oVLCGE8VRLl1JvqyOxUo4HaMIHXMA8GA1UdEwEB/wQFMAMB
Af8wDgYDVR0PAQH/BAQDAgEGMDsGA1UdHwQ0MDIwMKAuoCyGKmh0dHA6Ly9jcmwu
bmRpcy5udmlkaWEuY29tL2NybC9sMS1yb290LmNybDA3BggrBgEFBQcBAQQrMCkw
JwYIKwYBBQUHMAGGG2h0dHA6Ly9vY3NwLm5kaXMubnZpZGlhLmNvbTAdBgNVHQ4E
FgQUB0Kg6wOcgGB7oUFhmU2uJffCmx4wHwYDVR0jBBgwFoAUV4X/g/JjzGV9aLc6
W/SNSsv7SV8wCgYIKoZIzj0EAwMDaAAwZQIxAPIQhnveFxYIrPzBqViT2I34SfS4
JGWFnk/1UcdmgJmp+7l6rH/C4qxwntYSgeYrlQIwdjQuofHnhd1RL09OBO34566J
C9bYAosT/86cCojiGjhLnal9hJOH0nS/lrbaoc5a
-----END CERTIFICATE-----
-----BEGIN CERTIFICATE-----
MIICCzCCAZCgAwIBAgIQLTZwscoQBBHB/sDoKgZbVDAKBggqhkjOPQQDAzA1MSIw
IAYDVQQDDBlOVklESUEgRGV2aWNlIElkZW50aXR5IENBMQ8wDQYDVQQKDAZOVklE
SUEwIBcNMjExMTA1MDAwMDAwWhgPOTk5OTEyMzEyMzU5NTlaMDUxIjAgBgNVBAMM
GU5WSURJQSBEZXZpY2UgSWRlbnRpdHkgQ0ExDzANBgNVBAoMBk5WSURJQTB2MBAG
ByqGSM49AgEGBSuBBAAiA2IABA5MFKM7+KViZljbQSlgfky/RRnEQScW9NDZF8SX
gAW96r6u/Ve8ZggtcYpPi2BS4VFu6KfEIrhN6FcHG7WP05W+oM+hxj7nyA1r1jkB
2Ry70YfThX3Ba1zOryOP+MJ9vaNjMGEwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8B
Af8EBAMCAQYwHQYDVR0OBBYEFFeF/4PyY8xlfWi3Olv0jUrL+0lfMB8GA1UdIwQY
MBaAFFeF/4PyY8xlfWi3Olv0jUrL+0lfMAoGCCqGSM49BAMDA2kAMGYCMQCPeFM3
TASsKQVaT+8S0sO9u97PVGCpE9d/I42IT7k3UUOLSR/qvJynVOD1vQKVXf0CMQC+
EY55WYoDBvs2wPAH1Gw4LbcwUN8QCff8bFmV4ZxjCRr4WXTLFHBKjbfneGSBWwA=
-----END CERTIFICATE-----"""

# NVIDIA-signed VBIOS RIM 96.00.5E.00.01 (nv-local-gpu-verifier's test_no_gpu sample), zlib + base64.
NVIDIA_VBIOS_RIM_ZB64 = (
    "eNrNnFmTosrWhu/9FR11Liu6JSeGjt07gkmlFC0Ux5sTCZnggGIBivrrT2oNu3qofXYf4vuCiu62TCBZ78r15nq4oP8YpVFR0ow7jO+KVXH+dNom"
    "u/zb3bIo9l+bzbygO0Yzln9Z5emXNIub4rMJNEWRmp9hE0qANPNwybf0yylnd89Xf93lUuUZ4NsMZVl+KdHtUihJoCnhpjiJ78J/5UuKVHz3KUyz"
    "/UEEHdEk53efdnTLv921O0CS7j7taREu3w7lh/0+4VuhlSZvgwWNHfbtjshSIMuqHCAFYklhEmScgoChIOQsQqpMoihCGoUqUCSCsBpAhTMGAScR"
    "gqFMMJAx5AFhgUSxhinEqoqZmFWStDASNzryLF+lu2934It0u+3kdUC6+7PxSfz8IVL31X5eiWcZ/YljOfonU0hMM1qIs+8+ZWkijuQvS2dmnBZp"
    "dp3v5de75rvZXF7Qt6yC56zmIq1FdsgLzsJ0uz8Uq10cZ+lhf8tyxvP0kIW8WYTx54xHPBPJ5p9Xu4LHmYjs85buVhHPi8/ZaiuGozTb3iL7vE0Z"
    "T5rXBUmS9OmwosmbQk3+IklfiH39VwJ3nzhbFbcD7cexWKUsZYeweFu1jB9Xz9dl4txHek5SyvzzXshmq4yHhVjlHHw1VjsmQh/tefjtbui4jvvT"
    "+ORdzsHz0ceEFteYXbo7RDQsDhnPbgWgSOjjM0ZF9uvV+O6CawLeVFyPtFbZ9rpK76f6eJ5fnf0W2vtVfUnJy8KOOrowwj93zPNEb5MNXxb8U3HL"
    "sMtpLm58dcndJ5FJfroW6CcRzuooDvvZQdQyTQqe7eh1SDjvlln4tUPzpbC+9H/882rxd4H+Wwzmq4sYxOpron5HH/gtfQGGKpIjIlMFyJDLKAwU"
    "qkWIcyIHElIRJFQDEGAMIwp5hDBQYYRlsXXIqiSG1YiqkaxoKgNIfBXbDFIDrilABRJRX/Vdb8fZe5Xg363RYzWl8HeUIkTVIGDiT4hIIPY+rgYR"
    "CzGKZCnCioIjTROCFBlEkUopEFqwLAcgAlEYhpSEYmOEYRigUGRACWQYaYhxjaoKkhRNDj5WCqsrRb+jNCCaWCgSBJzKIKBMioIwjIj40CBEKtMA"
    "YkiTIaMRo1JAJQA4BwEIVCpHUMIhwjiKZBIgFKkE0wgCKHImuoASMRXQj5Wi6krx7yglshqoGtQARTjkIZdQACClFBHINBpxqCAZSGJ9CCSBijHi"
    "mhRRqqhMhTyMqBYqKlSYGikaINeyEDUeaArkQFKv/fNjpbi6UvI7SkON44iLmLjGQihrFMtEAVgOCIcqFcuKlZBxoFIcSFzRxDKJExCMRF8PQtHw"
    "IyRhLEmcEoaDCAOiBYTKGpAZw0TG/GOlpLpS+XeUyioRmEHFAilcUUIpIoBLXFYQBLIQIksSQpoUYh5AVWYqiwIo9i4YKQCI9VSDkEVYghREDHPC"
    "FCm48pnYixSx7IRH4cdK5epKlb+Utp6JrG7NRakmUK1781Sr6dN+Rx8NhfOggOpIo1wmoj6xjJRQbKVAAUGINUpDVaUB1EQZMk0SxC3KMpBVJqlc"
    "VpEwsmgvkGHRUyLRc4kCQ6BhAehiP1ZV5Vf6tIpwUHv6AVXxB/zeEhKNSVg8xNEQUCXiAIknHAVxBYmNBYYkEDsmCJEWQSaaoCCA6zlcLC8We2kE"
    "QkZkTilmmiygAEoyxBAxVUZMIBXU6C8VgooK/wv34P/vNXy5mXgiU4hKI00WvSZUJCnSVKqKx0slEJ0YQMwICCXRiBUVB1Rs5wKiNEFilAYyI0gN"
    "FSJ8xDRBKRQgxDENsYJEd2JItCsxAyN/3Uw8VCsskrAgFpmJZ1jR4QTLSDKDqhpymRPxFKuFlAmYDTEJxbOvaCkhYZF4lFUI4ZgxHkVEVYCECQ1D"
    "GcmywLwAKGogMVmQBf/rZkg04EASuuRIgKBEYCQJewuAEB0o4KIURL1IRJKCKOA8UIAmqFmmIcScCYjEVJYEiMgsArJAE5EOsUeIvswUDMTFKAKU"
    "Rb8sFFixUFDt29E1xEoScf0l4ooSSf0lkooS5fpLlCtKrD8agopsCNT6S6yIh0Crv8SKhAil2kuEFRERgvpLrMiIENZfYkW6gfWnG1iRbmD96QZW"
    "pBtYf7qBFekG1p9uYEW6gfWnG1iRbmD96QZWpBtYf7qBFekG1Z9uUEW6QfWnG1SRblD96QZVpBtUf7pBFekG1Z9uUEW6QfWnG1SRblD96QZVpBtU"
    "f7pBFekG1Z9uUEW6QfWnG1SRbnD96QZXpBtcf7rBFekG159ucEW6wfWnG1yRbnD96QZXpBtcf7rBFekG159ucEW6wfWnG1yRbnD96QZXpBtcf7rB"
    "FemG1J9uSEW6IfWnG1KRbkj96YZUpBtSf7ohFemG1J9uSEW6IfWnG1KRbkj96YZUpBtSf7ohFemG1J9uSEW6IfWnG1KRbuT6041ckW7k+tONXJFu"
    "5PrTjVyRbuT60438C7r5o/nuZdM/G3+w/OtoFYugxUUv756y/IP3TqWmpF3fO2X5Kv7X3Z+v13Lm7KL09tWku3S3CmmyutzegXV5sUzZJz2J02xV"
    "LLcfTCw3AbxO/DkEeAeAiPW7uP7hLK+vxV7D+7xNM/4vHrKcfn55RfZ50uHr28+fxkPn292zCj+ju/z6tm/+/df/esvvMsJ3R56ke84+56+Rv9z0"
    "n0/4i0w0fw7QWsU8L/7ntHyXkOe5JjQ58D9L3n1Snd7q2MTZEMeHABQKwuRyOIE9XgeeB6bsbLJOZht5F3t0O730qXnubceWDjt5cYv1/YS3gbeU"
    "P3/9oWTeVvn5CrxjfRs3W3N3s/LV9SFd982iWBZ+0b6f9dVBn6FL4Z02WT/GUaz52/Zp5DIoPY468rSL2tvE1ZTTaMrPQ7ndPnRd7CvJgfAtkR5O"
    "w9a9M9+4ezhon8ZtzC/WejWwtYFRtKYPysJahNO3EN/FdA2zy89vIc+IpFm0oG9fTJ4Vq0jUfcH/dB3H3FimqS9prJeOocfOg96zRQDLlPdWM1dP"
    "26b51B65WDN013Jb8aln6U9G3J+I727Dkch0NB4+eCNjtJguknA7OczhOJ5sWzmbjmPfcuOhFJ9cS4/F35M7zMu2N7cmnte1jIdBY7JJ7NHYjj2o"
    "ncO2dp7PhvsA4pN50R+e7zL39WTiuwaeWb5zca352b3oxL3EoN9KZw0xCG6D67fBkvp2z9U3bR2MbWPpmpOJ+27CWBzqG+7QK+14bjVEKB1LL/z5"
    "lEjzkWEF7dZ57tuBazxPYMblyE8WD0M7MRy7fwx3xjHctiQ61Q7uMC0bbf2mx7KMluNJbjzeJH3HLiWn1d8vIEnCtQFdQ28b5+dE6rHdNkYHw9D1"
    "lQ4dvWG0rXtbP8nyQN5s50ftyMbUl9vB0/3DJCebp9bUZPSwnz4M/WywYEePtE9bHy77CulR/95p+MXmiRNaQhciFw9m3iTHOZ9O5acj2iVUOdwX"
    "46YfnKLDoE3s3F00kxburtO8DKysvPcbF3lgbNemkVx0dk1Sx8N2K/bGLCu7WfDYWXNzH7c0pfU034wPuWcETtkpheyhtDaMuGy0Un2cXIpDoRbb"
    "h50xkaLpPZRxQoC+Px7V0tJvJ/u612kaulPqlj54vpFq6JFqN0Q1mQbWy345d7rl3DC8cUf3bLt70feuGYoqzNu6N24ZF91YLouUdYblYKUeA9i/"
    "hCY5NBbt5NLbEkinw/18RNYBlEozFpOlC+eylmy9dC2q6+XCc066o/QmzYSp20kxD5NTpKSgIRlr52FWmMSUiaT28HYY78Z9o7ug8bIwS/2etexV"
    "u9DUw6FoeU7p32/s3jQ/e7uug1XHaJhAiU7monvAknsCPT/oHNZm+6k4BcNJvIQnXUMwztLehGgsPVqdxs2+P1ryI5uu/atNB682HerdWZZ23KV7"
    "j568FV9NZaeVPuEfNZcTy04brjm/1bJeltFbLbceksV2cl5MyXoxMqbz6QmIz87IskuxFpb3zgONvzWBl5fms6fbdvkwGV/0VVtXz651tev45Pp6"
    "2RDmL91WOrcuTumu52LQPrlrFwz8MZmujbk7Kstu/GIksz943RfG28l2MXtIGsG2nzitxTLoTBLhrotjM+c6s3Od+B/YtfHrUP/emoYFNNoCo0Ef"
    "jhqjiZ+35uZsfT+dB+vHfNwcp8ew1zx0e9PhWmzNRdRFnWxxPvXWY+UpWHTDxDLvzSXUH7JepjXG90eFBAHOTcJ5ZzbPx9to+TCYRaenUWa3cbMg"
    "7krs/mgT9FNHaq+HobaiAyO1TGPn66PGzTFD9+YY09LbVzeJkHVXx1ftzCpto1l69rVGjLWOjDjOjNhuGV5o6J6XiTrYlA/vHObq7XYbLiXW0eXe"
    "WTvOUb8UJtrQmXsIdou9MNWyt+0fA/95X2i8bgx/5/X3G8N1Xxjp3fNkGdCJf1w1xiM46TlDyQ6k5WiIP7boAC62ln309p3Z/lHeeJkDFdwrGtLS"
    "lp/WtrWDvmxse9Zg4Kft4PHc6YN+6ZxUOYe7ZveCJWFRel4WyRDOWjpdFcN+r5vuzo2xumiNSAcOk0xVppo7s9XzfbRjxGP96f16CEcWLtVxN0Ub"
    "9/csWqyFRdfwL4u6QaB2JvqmiTLv8ngZCYsW/fIniw5Fu2r82K+si95/7lepKO2XLuvbiWu6r1YO39d549Z2OreWsw+2oXCOaCQ3H/9sx+/ceHHL"
    "vnBj450dx+4oLh9e7WhoP9nxezc+O7EhwjB+bPD/uL935mXD1uedl8SYujdvdbFt66ZjzWPdlt3jPJq54+5+Vw4uI76ZjofuMhrbiT+azA+Px+l8"
    "05iv4pkqPQZm1luNd9LTedF6HF+abg/NohZZK5tzp9dcje4fz2Kp0knkncL8oKrMdPpbUewPDX2bJ3RJU3tt07ns+oYNhkZ/pioOW6W4w1ynQ11d"
    "vbnNfnZby9VvjiytG00MpcfnJudZ193EtZ6t2Sk9JLJfurJ+Ss37dm/65rp1uC0PwXa4D8+ij7FtsqFTW1CUVvRg/xyYYB2gh30w0nJ39PK7/7O3"
    "X63d+F+9/Wrtxnu//mjXH729p7Ns8NjFC0vfSKpl5JsdaWj4whdr/SdvL0rhbdH8We9hap/O48wa9GKS0+5UzONjzy4eN31cwMbJiLcl8zvDieer"
    "ylw8qtj+aEuOwUbsC9loqa+N8ilbsXO3e24naUo2BWjNZr526R2bZKk25Ad/1/f49NgLfOjhU5j53v6+jJjaSS4dlYUH/dvvebt7bb+B+eptb8iy"
    "daoTr6+gaAn6QOnNVqGld8WyPC0368GjMI5+MVrXjtP4vuXYj64uvfaq9quH3dG4dMpXx53eG0e0nrEUhzDZBdvksDgbowBq0s1tpv5Cxe6pv7aB"
    "ewkv/Rdf931XeFvHrj++NPoXVxK+bv3cAP9ZNO85ffRhNMLDH1m4cfXwwTbPK+3Yd++dEibR+HI2ElGeJTVBp6X4ZrwH0Avt89jfIp/GpzLDKiPk"
    "vgsnTiOZzh1ro/QT3fFYOGm2IoUf2j3n3qOHtYY6+cjB0xnU1Mf9lOChH1+0wrz3ZBWHdNg0Zo2pzRcpdMv5DwX/qxp+LeGfIPfvTrbK95A7FtUu"
    "NojLX6DbuPbtK+iKxHxojk7bOueh9Sivlp2n4XGROIg/LfB8c1zbDcAOtK/iQhfWiE8T99jP9sTfpVu0Yp15eyoqeqOvdf+4dk7y5NLZNjGH7dVC"
    "Py9sZ2xYjUH38bInfNXUpdV4sWfHXcx3VjlRPdos22zlbx8UY48/MkfzuwfK5vtHze8eRcXXH/9rvz8b/wEbJpf/"
)


def evidence(report: bytes | str = SAMPLE_REPORT_HEX, chain: str = SAMPLE_CHAIN_PEM, cc_mode: str = "on",
             ) -> GpuEvidence:
    hex_report = report.hex() if isinstance(report, bytes) else report
    return GpuEvidence(uuid="GPU-11111111-2222-3333-4444-555555555555", cc_mode=cc_mode, report=hex_report,
                       certificate_chain=chain)


def verify(ev: GpuEvidence, nonce: bytes = SAMPLE_NONCE, *, at: dt.datetime = AT, rims: Path | None = None,
           policy: GpuCcPolicy = NO_RIMS_OK, **kw: Any) -> GpuVerdict:
    return verify_gpu_evidence(ev, nonce, at=at, rims=rims, policy=policy, **kw)


def flipped(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


SAMPLE_REPORT = bytes.fromhex(SAMPLE_REPORT_HEX)
SAMPLE_CERTS = x509.load_pem_x509_certificates(SAMPLE_CHAIN_PEM.encode())


# ------------------------------------------------------------------------------------------ the verifier, offline


def test_nvidias_sample_verifies_as_far_as_offline_allows() -> None:
    v = verify(evidence())
    assert v.status == "verified" and v.ok
    assert (v.driver_version, v.vbios_version) == ("550.90.07", "96.00.9f.00.01")
    assert v.measurements_checked is False
    assert "NOT checked" in v.detail and "OCSP" in v.detail


def test_an_offline_verifier_without_rims_refuses_unless_the_policy_allows(tmp_path: Path) -> None:
    v = verify(evidence(), policy=STRICT)
    assert (v.status, v.ok, v.measurements_checked) == ("gpu_rim_unavailable", False, False)
    # A cache without this driver's and VBIOS's RIMs is no better; the ids the operator must fetch are named.
    v = verify(evidence(), rims=tmp_path, policy=STRICT)
    assert v.status == "gpu_rim_unavailable"
    assert "NV_GPU_DRIVER_GH100_550.90.07" in v.detail and "NV_GPU_VBIOS_1010_0200_882_96009F0001" in v.detail
    # The policy's cache is the default when the call names none.
    v = verify(evidence(), policy=GpuCcPolicy(rim_cache_dir=tmp_path))
    assert v.status == "gpu_rim_unavailable" and "in the cache" in v.detail


def test_a_report_for_another_nonce_is_refused() -> None:
    v = verify(evidence(), nonce=bytes(32))
    assert (v.status, v.ok, v.driver_version) == ("gpu_nonce_mismatch", False, "550.90.07")
    assert verify(evidence(), nonce=SAMPLE_NONCE[:16]).status == "gpu_nonce_mismatch"  # a caller's bad nonce


@pytest.mark.parametrize("offset", [
    4,  # the request's nonce: the signature covers it, so a replayed report cannot be re-aimed
    37 + 8 + 100,  # a measurement value
    len(SAMPLE_REPORT) - 96 - 30,  # opaque data (the FWID)
    len(SAMPLE_REPORT) - 1,  # the signature
], ids=["request-nonce", "measurement", "opaque", "signature"])
def test_a_flipped_byte_in_the_report_breaks_its_signature(offset: int) -> None:
    v = verify(evidence(flipped(SAMPLE_REPORT, offset)))
    assert (v.status, v.ok) == ("gpu_report_invalid", False)
    assert "signature" in v.detail
    assert v.driver_version == v.vbios_version == ""  # nothing from an unauthenticated report is shown


@pytest.mark.parametrize("report", [
    SAMPLE_REPORT[:-1], SAMPLE_REPORT + b"\x00", SAMPLE_REPORT[:37], b"\x11\xe0" + bytes(200), b"",
], ids=["short", "trailing", "request-only", "zeros", "empty"])
def test_a_malformed_report_is_invalid_not_an_exception(report: bytes) -> None:
    v = verify(evidence(report))
    assert v.status == ("gpu_report_missing" if not report else "gpu_report_invalid")


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_a_flipped_byte_in_a_certificate_breaks_the_chain(index: int) -> None:
    certs = [c.public_bytes(serialization.Encoding.DER) for c in SAMPLE_CERTS]
    certs[index] = flipped(certs[index], len(certs[index]) - 10)  # inside the issuer's signature
    pem = "".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM).decode()
                  for d in certs)
    v = verify(evidence(chain=pem))
    assert (v.status, v.ok) == ("gpu_cert_chain_invalid", False)
    assert "not signed by" in v.detail


def test_the_nodes_own_root_is_never_trusted() -> None:
    """A chain that ends in a look-alike "NVIDIA Device Identity CA" of the node's making gets nowhere: the root
    is pinned, and the evidence's last certificate is dropped, not added to the trust store."""
    key = ec.generate_private_key(ec.SECP384R1())
    fake_root = _cert(SAMPLE_CERTS[-1].subject, key, SAMPLE_CERTS[-1].subject, key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP384R1())
    leaf = _cert(SAMPLE_CERTS[0].subject, leaf_key, fake_root.subject, key, ca=False)
    v = verify(evidence(chain=_pem(leaf, fake_root)))
    assert v.status == "gpu_cert_chain_invalid" and "not signed by the pinned" in v.detail
    # NVIDIA's chain without its last three links does not reach the root either.
    assert verify(evidence(chain=_pem(*SAMPLE_CERTS[:2]))).status == "gpu_cert_chain_invalid"
    assert verify(evidence(chain="not a certificate")).status == "gpu_cert_chain_invalid"


def test_the_chain_is_judged_at_the_given_time() -> None:
    """The provisioner ICA is valid from 2022-03-01: at an earlier time the chain is refused."""
    v = verify(evidence(), at=dt.datetime(2022, 1, 1, tzinfo=dt.UTC))
    assert v.status == "gpu_cert_chain_invalid" and "not valid at" in v.detail
    assert verify(evidence(), at=dt.datetime(2026, 1, 1)).status == "verified"  # naive: taken as UTC


@pytest.mark.parametrize(("mode", "status"), [("off", "gpu_cc_off"), ("unsupported", "gpu_cc_off"),
                                              ("devtools", "gpu_cc_devtools")])
def test_cc_off_fails_only_when_required(mode: str, status: str) -> None:
    ev = GpuEvidence(uuid="GPU-1", cc_mode=mode)
    assert (verify(ev, policy=GpuCcPolicy(require_cc=True)).status,
            verify(ev, policy=GpuCcPolicy(require_cc=True)).ok) == (status, False)
    relaxed = verify(ev, policy=GpuCcPolicy(require_cc=False))
    assert (relaxed.status, relaxed.ok, relaxed.driver_version) == (status, True, "")


def test_cc_on_without_a_report_is_missing_evidence() -> None:
    assert verify(GpuEvidence(uuid="GPU-1", cc_mode="on")).status == "gpu_report_missing"
    assert verify(evidence(chain="")).status == "gpu_report_missing"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(offset=st.integers(0, len(SAMPLE_REPORT) - 1), value=st.integers(1, 255),
       cut=st.integers(0, len(SAMPLE_REPORT) - 1))
def test_no_corruption_of_the_report_escapes_as_an_exception(offset: int, value: int, cut: int) -> None:
    b = bytearray(SAMPLE_REPORT)
    b[offset] ^= value
    for report in (bytes(b), SAMPLE_REPORT[:cut]):
        v = verify(evidence(report))
        assert v.status in REASONS and not v.ok


# ---------------------------------------------------------------------------------------------------------- RIMs


@pytest.fixture(scope="module")
def rim_signer() -> tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A test RIM-signing root and its signer (P-384, like NVIDIA's)."""
    root_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qvm test RIM root")])
    root = _cert(root_name, root_key, root_name, root_key, ca=True)
    leaf = _cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qvm test RIM signer")]), key, root_name,
                 root_key, ca=False)
    return root, leaf, key


def _golden(indexes: range, change: int | None = None) -> dict[int, bytes]:
    m = parse_report(SAMPLE_REPORT).measurements
    return {i: (bytes(len(m[i])) if i == change else m[i]) for i in indexes}


def _rim(signer: tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey], version: str,
         golden: dict[int, bytes]) -> bytes:
    """A SWID-tag RIM shaped like NVIDIA's, enveloped-signed (ECDSA-SHA384, C14N 1.1) by the test signer. An
    inactive entry with a junk value sits beside the active ones: it must be ignored."""
    signxml = pytest.importorskip("signxml")
    etree = pytest.importorskip("lxml.etree")
    swid, h = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd", "http://www.w3.org/2001/04/xmlenc#sha384"
    root = etree.Element(f"{{{swid}}}SoftwareIdentity", nsmap={None: swid, "SHA384": h}, name="GH100",
                         tagId="qvm-test", version="1.0")
    etree.SubElement(root, f"{{{swid}}}Meta", colloquialVersion=version)
    payload = etree.SubElement(root, f"{{{swid}}}Payload")
    entries = [(i, "True", v) for i, v in golden.items()] + [(200, "False", b"\xee" * 48)]
    for i, active, value in entries:
        etree.SubElement(payload, f"{{{swid}}}Resource", {f"{{{h}}}Hash0": value.hex()}, type="Measurement",
                         index=str(i), active=active, alternatives="1", name=f"Measurement_{i}",
                         size=str(len(value)))
    _, leaf, key = signer
    signed = signxml.XMLSigner(signature_algorithm=signxml.SignatureMethod.ECDSA_SHA384,
                               digest_algorithm=signxml.DigestAlgorithm.SHA384).sign(root, key=key, cert=[leaf])
    return bytes(etree.tostring(signed))


def _cache(tmp_path: Path, driver: bytes, vbios: bytes) -> Path:
    driver_id, vbios_id = rim_ids(parse_report(SAMPLE_REPORT))
    (tmp_path / f"{driver_id}.swidtag").write_bytes(driver)
    (tmp_path / vbios_id).write_bytes(vbios)
    return tmp_path


def test_measurements_matching_signed_rims_verify(tmp_path: Path, rim_signer: Any) -> None:
    rims = _cache(tmp_path, _rim(rim_signer, "550.90.07", _golden(range(0, 32))),
                  _rim(rim_signer, "96.00.9F.00.01", _golden(range(32, 64))))
    v = verify(evidence(), rims=rims, policy=STRICT, extra_rim_roots=[rim_signer[0]])
    assert (v.status, v.ok, v.measurements_checked) == ("verified", True, True)
    assert "64 measurements match" in v.detail


def test_a_measurement_unlike_its_reference_value_is_a_mismatch(tmp_path: Path, rim_signer: Any) -> None:
    rims = _cache(tmp_path, _rim(rim_signer, "550.90.07", _golden(range(0, 32))),
                  _rim(rim_signer, "96.00.9f.00.01", _golden(range(32, 64), change=40)))
    v = verify(evidence(), rims=rims, policy=STRICT, extra_rim_roots=[rim_signer[0]])
    assert (v.status, v.ok) == ("gpu_rim_mismatch", False)
    assert "40 (VBIOS)" in v.detail


def test_a_rim_for_another_version_is_a_mismatch(tmp_path: Path, rim_signer: Any) -> None:
    rims = _cache(tmp_path, _rim(rim_signer, "545.00", _golden(range(0, 32))),
                  _rim(rim_signer, "96.00.9f.00.01", _golden(range(32, 64))))
    v = verify(evidence(), rims=rims, policy=STRICT, extra_rim_roots=[rim_signer[0]])
    assert v.status == "gpu_rim_mismatch" and "545.00" in v.detail


def test_two_rims_claiming_one_measurement_are_invalid(tmp_path: Path, rim_signer: Any) -> None:
    rims = _cache(tmp_path, _rim(rim_signer, "550.90.07", _golden(range(0, 33))),
                  _rim(rim_signer, "96.00.9f.00.01", _golden(range(32, 64))))
    assert verify(evidence(), rims=rims, policy=STRICT,
                  extra_rim_roots=[rim_signer[0]]).status == "gpu_rim_invalid"


def test_a_rim_edited_after_signing_or_signed_by_an_unknown_root_is_invalid(tmp_path: Path,
                                                                            rim_signer: Any) -> None:
    m = parse_report(SAMPLE_REPORT).measurements
    driver = _rim(rim_signer, "550.90.07", _golden(range(0, 32)))
    vbios = _rim(rim_signer, "96.00.9f.00.01", _golden(range(32, 64)))
    edited = driver.replace(m[5].hex().encode(), (b"0" * 96), 1)
    assert edited != driver
    v = verify(evidence(), rims=_cache(tmp_path, edited, vbios), policy=STRICT, extra_rim_roots=[rim_signer[0]])
    assert v.status == "gpu_rim_invalid" and "signature" in v.detail
    v = verify(evidence(), rims=_cache(tmp_path, driver, vbios), policy=STRICT)  # the test root not trusted
    assert v.status == "gpu_rim_invalid" and "not a pinned root" in v.detail


def test_nvidias_signed_rim_is_authenticated_then_compared(tmp_path: Path, rim_signer: Any) -> None:
    """NVIDIA's real RIM passes signature and chain (else gpu_rim_invalid): it is refused only as a RIM for
    another VBIOS. Once its signer has expired, it is refused as invalid. Saved as the RIM service's JSON answer
    to show that form is read too."""
    nvidia = zlib.decompress(base64.b64decode(NVIDIA_VBIOS_RIM_ZB64))
    answer = json.dumps({"id": "x", "rim": base64.b64encode(nvidia).decode()}).encode()
    rims = _cache(tmp_path, _rim(rim_signer, "550.90.07", _golden(range(0, 32))), answer)
    v = verify(evidence(), at=AT_RIM, rims=rims, policy=STRICT, extra_rim_roots=[rim_signer[0]])
    assert v.status == "gpu_rim_mismatch", v.detail
    assert "VBIOS RIM is for version 96.00.5E.00.01" in v.detail
    v = verify(evidence(), at=AT, rims=rims, policy=STRICT, extra_rim_roots=[rim_signer[0]])
    assert v.status == "gpu_rim_invalid" and "not valid at" in v.detail


def test_cached_rims_without_the_gpu_cc_extra_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setitem(sys.modules, "signxml", None)  # as if the gpu-cc extra were not installed
    rims = _cache(tmp_path, b"<x/>", b"<x/>")
    v = verify(evidence(), rims=rims, policy=NO_RIMS_OK)
    assert (v.status, v.ok) == ("gpu_verifier_missing", False)


def test_a_malformed_rim_is_invalid(tmp_path: Path, rim_signer: Any) -> None:
    pytest.importorskip("signxml")
    vbios = _rim(rim_signer, "96.00.9f.00.01", _golden(range(32, 64)))
    for junk in (b"<not xml", b"<x/>", b'{"rim": "%%%"}', b"\x00" * 10):
        v = verify(evidence(), rims=_cache(tmp_path, junk, vbios), policy=STRICT, extra_rim_roots=[rim_signer[0]])
        assert v.status == "gpu_rim_invalid", junk


# -------------------------------------------------------------------------------------------- the node's side


class FakeCcNvml(FakeNvml):
    """`FakeNvml` plus the two CC attestation calls (the hardware boundary), answering with NVIDIA's sample
    report and chain in the real pynvml ctypes structures. It cannot sign: the report is the sample's whatever the
    nonce, so the nonces it was asked with are recorded for the test to check."""

    def __init__(self, *args: Any, refuse: set[int] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.asked: list[bytes] = []
        self.refuse = refuse or set()

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, h: Any, nonce: bytes) -> Any:
        self._gpu(h)
        if h.index in self.refuse:
            raise pynvml.NVMLError_NotSupported()
        self.asked.append(bytes(nonce))
        r = pynvml.c_nvmlConfComputeGpuAttestationReport_t()
        r.nonce[:] = list(nonce)
        r.attestationReportSize = len(SAMPLE_REPORT)
        r.attestationReport[:len(SAMPLE_REPORT)] = list(SAMPLE_REPORT)
        return r

    def nvmlDeviceGetConfComputeGpuCertificate(self, h: Any) -> Any:
        self._gpu(h)
        chain = SAMPLE_CHAIN_PEM.encode()
        c = pynvml.c_nvmlConfComputeGpuCertificate_t()
        c.attestationCertChainSize = len(chain)
        c.attestationCertChain[:len(chain)] = list(chain)
        return c


H100S = [FakeNvmlGpu(), FakeNvmlGpu(uuid="GPU-22222222-2222-3333-4444-555555555555", pci_bus_id="00000000:42:00.0")]


def test_cc_on_gpus_hand_over_their_report_and_chain() -> None:
    nvml = FakeCcNvml(H100S, cc_state=(2, 1, 0), cc_gpus_capable=True)
    a, b = collect_gpu_evidence(SAMPLE_NONCE, nvml=nvml)
    assert (a.uuid, b.uuid) == (H100S[0].uuid, H100S[1].uuid)
    assert a.cc_mode == "on" and a.report == SAMPLE_REPORT_HEX and a.certificate_chain == SAMPLE_CHAIN_PEM
    assert nvml.asked == [SAMPLE_NONCE, SAMPLE_NONCE]
    assert nvml.inits == nvml.shutdowns == 1
    # What the node hands over is what the verifier checks.
    assert verify(a).status == "verified"


@pytest.mark.parametrize(("state", "mode"), [((2, 0, 0), "off"), ((2, 1, 1), "devtools"), (None, "unsupported")])
def test_gpus_without_cc_are_listed_without_a_report(state: tuple[int, int, int] | None, mode: str) -> None:
    nvml = FakeCcNvml(H100S, cc_state=state, cc_gpus_capable=True)
    out = collect_gpu_evidence(SAMPLE_NONCE, nvml=nvml)
    assert [(e.uuid, e.cc_mode, e.report, e.certificate_chain) for e in out] == [
        (g.uuid, mode, "", "") for g in H100S]
    assert nvml.asked == []  # no attestation call on a GPU not in CC mode
    assert verify(out[0], policy=STRICT).status in ("gpu_cc_off", "gpu_cc_devtools")


def test_a_gpu_refusing_its_report_is_still_listed() -> None:
    nvml = FakeCcNvml(H100S, cc_state=(2, 1, 0), refuse={1})
    a, b = collect_gpu_evidence(SAMPLE_NONCE, nvml=nvml)
    assert a.report and (b.cc_mode, b.report) == ("on", "")
    assert verify(b).status == "gpu_report_missing"


def test_no_driver_no_evidence() -> None:
    assert collect_gpu_evidence(SAMPLE_NONCE, nvml=FakeCcNvml(H100S, init_error=pynvml.NVMLError_DriverNotLoaded)) \
        == ()
    assert collect_gpu_evidence(SAMPLE_NONCE, nvml=FakeCcNvml([], cc_state=(2, 1, 0))) == ()


def test_the_nonce_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        collect_gpu_evidence(b"short", nvml=FakeCcNvml(H100S))


# ------------------------------------------------------------------------------------------------------- helpers


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
         .not_valid_after(dt.datetime(2040, 1, 1, tzinfo=dt.UTC))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    return b.sign(issuer_key, hashes.SHA384())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
