"""The node-agent's side of attestation: measured launch (measurement log + PCR extends) and the TPM."""
