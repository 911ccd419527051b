"""`python -m services.scheduler`: run one scheduler replica (run as many as you like)."""

from services.scheduler.service import Scheduler
from services.scheduler.settings import SchedulerSettings
from shared.identity import Identity, Role
from shared.runtime import serve

if __name__ == "__main__":
    serve("scheduler", SchedulerSettings, lambda s: Identity(Role.SCHEDULER), Scheduler.create)
