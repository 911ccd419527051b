"""Confinement of the VMM process: a cgroup with the job's CPU and memory limits, and a seccomp
allow-list. Both are applied in the child between fork and exec, before QEMU runs a single instruction."""
