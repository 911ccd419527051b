"""Confidential-VM evidence: AMD SEV-SNP attestation reports and Intel TDX quotes, parsed and verified against
the vendors' pinned roots (pure Python over `cryptography`; used by the verifier, the CLI and the client SDK)."""
