"""VMM drivers behind one small interface (`base.Vmm`): QEMU microvm here, Firecracker and Cloud
Hypervisor through their REST APIs."""
