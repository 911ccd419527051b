"""The runtime guard's programs and rules: BPF programs that keep the host and a running job's VMM apart,
while the job runs.

The VMM (and every process it forks) may not exec, ptrace, mount, load modules or kexec kernels, or call
bpf(); host processes other than the node-agent may not ptrace or read the VMM's memory, nor open the
instance's volume and scratch files. Every hit of a rule (rules.py) is reported to the agent as a `Finding`.

Two modes, one build (both sets of programs are in the one object; the loader attaches one):
- enforce: BPF LSM hooks; the rules marked enforced are denied in the kernel (-EPERM).
- observe: syscall and sched tracepoints, where the kernel refuses BPF LSM programs; every rule is reported,
  none denied (`Finding.enforced` is false), and the agent's response (stopping the job, revoking the node
  for host-side tampering) comes from user space. Known gaps: guard.bpf.c, "observe mode".

    build = build_guard()                 # clang + libbpf, cached, reproducible (build.py)
    build.digest                          # what the agent's measured launch names, and a policy approves

They live in the shared library because the measured launch names them: the node-agent loads them (its
`services/node_agent/guard/` runs the loader and answers findings) and `qvm attest policy` / `qvm up` must
predict their digest, as they predict the agent's code digest.

`available()` says which mode this host runs the guard in, if any, and why (BTF, root, toolchain, tracefs or
the BPF LSM, a real load and attach).
"""

from shared.guard.build import GuardBuild, GuardError, available, build_guard
from shared.guard.rules import MODES, RULES, Mode, Rule, Severity

__all__ = ["MODES", "RULES", "GuardBuild", "GuardError", "Mode", "Rule", "Severity", "available", "build_guard"]
