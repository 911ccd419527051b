"""`python -m services.attestation_verifier`: run one verifier replica (stateless; run as many as you like)."""

from services.attestation_verifier.service import Verifier
from services.attestation_verifier.settings import VerifierSettings
from shared.identity import Identity, Role
from shared.runtime import serve

if __name__ == "__main__":
    serve("attestation-verifier", VerifierSettings, lambda s: Identity(Role.ATTESTATION_VERIFIER), Verifier.create)
