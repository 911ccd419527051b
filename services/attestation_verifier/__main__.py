"""`python -m services.attestation_verifier` — not built yet.

The verifier (TPM quotes, nonces in KV, measured-launch policy, re-attestation) is issue #4. Until then
this entry point refuses to start instead of pretending to verify anything; `qvm up` does not start it,
and the scheduler's default minimum trust (`trusted`) keeps every node ineligible until it exists.
"""

import sys

if __name__ == "__main__":
    sys.stderr.write("attestation-verifier is not implemented yet (issue #4); refusing to start\n")
    sys.exit(3)
