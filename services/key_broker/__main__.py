"""`python -m services.key_broker` — not built yet.

Key release (envelope encryption, HPKE to the instance key, LUKS2 volumes) is issue #5. Until then this
entry point refuses to start instead of pretending to hold keys; `qvm up` does not start it.
"""

import sys

if __name__ == "__main__":
    sys.stderr.write("key-broker is not implemented yet (issue #5); refusing to start\n")
    sys.exit(3)
