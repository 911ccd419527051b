"""The node's teardown phase: everything one instance held on this host released in one sequence, with
evidence of every wipe, whatever ended it (its workload exited or failed, a cancellation or teardown
request, an agent crash and restart, the periodic sweep).

    sequence  `tear_down(Remains) -> Evidence`: the one entry point and its order (VMM, guest RAM, network
              namespace, volume, cgroup, work directory, GPUs); `Evidence.report` is `instance.destroyed`
    leftover  the remains of an instance no live job owns, found on the host (`leftover_remains`), and the
              owner record that lets a restarted agent report them (`write_owner`, `read_owner`)
    procfs    /proc forensics for a leftover: its VMM verified by command line, its guest RAM memfd
    ram       the guest RAM scrub (memfd overwritten and read back)

A live instance hands over its own remains (`Instance.tear_down`). The wipes of the volume
(`volume.erase_volume`) and of VRAM (`isolation.gpus` over `gpu.vram`) live with their resources.
"""

from services.node_agent.teardown.leftover import (
    Owner,
    leftover_dirs,
    leftover_remains,
    read_owner,
    write_owner,
)
from services.node_agent.teardown.sequence import Evidence, GpuRelease, Remains, Stopped, tear_down

__all__ = ["Evidence", "GpuRelease", "Owner", "Remains", "Stopped", "leftover_dirs", "leftover_remains",
           "read_owner", "tear_down", "write_owner"]
