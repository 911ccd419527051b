"""Joining a hoster's node to a running platform: invitation, TPM-proven enrolment, certificates, withdrawal.

The operator invites a node (`qvm node invite NODE`): a single-use token with a short TTL, kept in KV only
as its SHA-256 (`invites`). The hoster runs `qvm node join TOKEN --control-plane URL` (`client`): keys are
made on the node and never leave it (certificate signing requests); the control plane's registrar
(`registrar`, served over HTTPS by `server`) checks the token, the node's TPM (EK certificate chain, then
credential activation: only the TPM holding that EK, with the AK beside it, can answer), and only then
signs the node's certificates and grants its bus identity by regenerating the NATS authorization and
reloading the server, without restarting it or any service. The same registrar withdraws nodes
(`qvm node revoke`, or the node's own `qvm node uninstall`): the identity leaves the NATS config at once
and a `node.revoked` event makes the verifier withdraw its trust, which stops its jobs and keys.

The wire types are in `protocol`; the token's format is in `token`.
"""
