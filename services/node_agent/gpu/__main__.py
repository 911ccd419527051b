"""`python -m services.node_agent.gpu scrub DEVICE [--chunk-mib N]`: one VRAM scrub in this process, its
evidence printed as one JSON line (`VramScrub`), or `{"reason": …, "detail": …}` and exit status 3 when the
driver fails. `scrub_vram_isolated` runs this in a fresh process for each scrub."""

from __future__ import annotations

import argparse
import json
import sys

from services.node_agent.gpu.cuda import CudaError
from services.node_agent.gpu.vram import DEFAULT_CHUNK_BYTES, scrub_vram


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.node_agent.gpu")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scrub", help="claim, zero and verify all free VRAM of one GPU")
    s.add_argument("device", help="GPU UUID (GPU-…), PCI bus id, or CUDA ordinal")
    s.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_BYTES >> 20)
    a = p.parse_args(argv)
    device: int | str = int(a.device) if a.device.isdigit() else a.device
    try:
        result = scrub_vram(device, chunk_bytes=a.chunk_mib << 20)
    except CudaError as exc:
        print(json.dumps({"reason": exc.reason, "detail": exc.detail}), flush=True)
        return 3
    print(result.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
