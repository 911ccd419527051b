"""`python -m services.key_broker`: run one key-broker replica (its state is in KV; run as many as you like).

Every replica loads the same KEK ring from the configured source (`QVM_KEK_SOURCE`) at start.
"""

from services.key_broker.service import KeyBroker
from services.key_broker.settings import KeyBrokerSettings
from shared.identity import Identity, Role
from shared.runtime import serve

if __name__ == "__main__":
    serve("key-broker", KeyBrokerSettings, lambda s: Identity(Role.KEY_BROKER), KeyBroker.create)
