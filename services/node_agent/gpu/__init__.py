"""The node-agent's GPU side: NVML inventory (`nvml`), a ctypes binding to the CUDA driver (`cuda`), and the
VRAM scrub that wipes and verifies a GPU's memory between jobs (`vram`, over one device `session` and the
PTX kernels in `ptx`). Nothing here needs the CUDA toolkit: only the NVIDIA driver's libnvidia-ml and
libcuda, and on a host without them every entry point fails cleanly (an empty inventory, a `CudaError` with
reason `no_libcuda`).
"""

from __future__ import annotations

from services.node_agent.gpu.cuda import CudaDriver, CudaError, load_libcuda
from services.node_agent.gpu.nvml import nvml_gpus, read_inventory
from services.node_agent.gpu.vram import (
    ScrubReport,
    VramFill,
    VramSurvey,
    fill_vram,
    scrub_vram,
    scrub_vram_isolated,
    scrub_vram_report,
    survey_vram,
)

__all__ = [
    "CudaDriver",
    "CudaError",
    "ScrubReport",
    "VramFill",
    "VramSurvey",
    "fill_vram",
    "load_libcuda",
    "nvml_gpus",
    "read_inventory",
    "scrub_vram",
    "scrub_vram_isolated",
    "scrub_vram_report",
    "survey_vram",
]
