"""JSON-over-HTTP on a unix socket, as Firecracker and Cloud Hypervisor expose their APIs (httpx)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx

from services.node_agent.vmm.base import VmmError, VmProcess

__all__ = ["UdsApi", "api_socket_path", "stop_through_api"]


def api_socket_path(instance_id: str, suffix: str) -> Path:
    """A short path for a VMM's API socket (unix socket paths are limited to 108 bytes)."""
    base = Path("/run/qvm") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / "qvm-run"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base / f"{instance_id[-40:]}.{suffix}"


class UdsApi:
    def __init__(self, sock: Path, timeout: float = 5.0) -> None:
        self.sock = sock
        self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock)),
                                         base_url="http://localhost", timeout=timeout)

    async def wait_ready(self, proc: asyncio.subprocess.Process, wait_s: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not self.sock.exists():
            if proc.returncode is not None:
                raise VmmError("vmm_start_failed", f"the VMM exited with {proc.returncode} before its API came up")
            if loop.time() > deadline:
                raise VmmError("vmm_api_unavailable", f"no API socket at {self.sock} after {wait_s:g}s")
            await asyncio.sleep(0.01)

    async def put(self, path: str, body: dict[str, Any] | None = None) -> None:
        try:
            resp = await self._client.put(path, json=body)
        except httpx.HTTPError as exc:
            raise VmmError("vmm_api_error", f"PUT {path}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 300:
            raise VmmError("vmm_api_error", f"PUT {path}: {resp.status_code} {_fault(resp)}")

    async def get(self, path: str) -> Any:
        try:
            resp = await self._client.get(path)
        except httpx.HTTPError as exc:
            raise VmmError("vmm_api_error", f"GET {path}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 300:
            raise VmmError("vmm_api_error", f"GET {path}: {resp.status_code} {_fault(resp)}")
        return resp.json()

    async def close(self) -> None:
        await self._client.aclose()


def _fault(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    return str(body.get("fault_message", body) if isinstance(body, dict) else body)[:300]


async def stop_through_api(vm: VmProcess, calls: list[tuple[str, dict[str, Any] | None]], grace_s: float) -> None:
    """Ask the VMM to stop through its API (`calls` in order), kill it after `grace_s`, release its channel
    and API socket."""
    if vm.proc.returncode is None and vm.api_socket is not None:
        api = UdsApi(vm.api_socket, timeout=2.0)
        for path, body in calls:
            with contextlib.suppress(VmmError):
                await api.put(path, body)
        await api.close()
        try:
            await asyncio.wait_for(vm.proc.wait(), grace_s)
        except TimeoutError:
            await vm.kill()
    elif vm.proc.returncode is None:
        await vm.kill()
    if vm.channel is not None:
        vm.channel.close()
        vm.channel = None
    if vm.api_socket is not None:
        vm.api_socket.unlink(missing_ok=True)
