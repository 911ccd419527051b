"""The runtime guard on the node: the loader process (`RuntimeGuard`, guard.py) that attaches the programs
`shared.guard` builds and reports each finding, and the agent's answer to findings (respond.py).

    build = build_guard()                             # shared.guard: cached, reproducible
    guard = await RuntimeGuard.start(build)           # enforce if the kernel can, else observe
    guard.mode                                        # "enforce" | "observe"
    await guard.watch(instance_id, vmm_pid, [volume, scratch])
    async for finding in guard.findings(): ...
    await guard.unwatch(instance_id); await guard.close()
"""

from services.node_agent.guard.guard import Finding, RuntimeGuard
from shared.guard import MODES, RULES, GuardBuild, GuardError, Mode, Rule, Severity, available, build_guard

__all__ = ["MODES", "RULES", "Finding", "GuardBuild", "GuardError", "Mode", "Rule", "RuntimeGuard", "Severity",
           "available", "build_guard"]
