"""`python -m services.janitor`: deadline and orphan sweeps, teardown requests."""

from services.janitor.service import Janitor
from services.janitor.settings import JanitorSettings
from shared.identity import Identity, Role
from shared.runtime import serve

if __name__ == "__main__":
    serve("janitor", JanitorSettings, lambda s: Identity(Role.JANITOR), Janitor.create)
