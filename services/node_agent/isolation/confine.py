"""The launch phase's confinement hook: what the VMM's child does between fork and exec, so the VMM runs
its first instruction already inside the instance's cgroup, network namespace and seccomp filter. All of
it is prepared in the agent (filter compiled, namespace opened); the child only makes syscalls."""

from __future__ import annotations

from collections.abc import Callable

from services.node_agent.isolation.cgroups import VmCgroup
from services.node_agent.isolation.network import InstanceNetwork
from services.node_agent.isolation.seccomp import prepare as prepare_seccomp

__all__ = ["confinement"]


def confinement(cgroup: VmCgroup | None, net: InstanceNetwork | None,
                allow: frozenset[str] | None) -> tuple[Callable[[], None] | None, list[int]]:
    """(confine, descriptors to close after the launch)."""
    if cgroup is None and net is None and allow is None:
        return None, []

    seccomp_filter = prepare_seccomp(allow) if allow is not None else None
    join_netns, netns_fd = net.joiner() if net is not None else (None, -1)

    def confine() -> None:  # in the VMM's child, between fork and exec; seccomp last (it forbids setns)
        if cgroup is not None:
            cgroup.join_self()
        if join_netns is not None:
            join_netns()
        if seccomp_filter is not None:
            seccomp_filter.load()

    return confine, [netns_fd] if netns_fd >= 0 else []
