"""A stand-in for the Firecracker and Cloud Hypervisor binaries (neither installs here): it serves their
documented REST API on the unix socket the driver names, rejects every request that the real API would
reject (unknown fields, missing fields, wrong types, calls in the wrong state), records each request for
the test to check, and after boot answers the guest channel the way qvm's guest init does.

    fake_vmm.py firecracker --api-sock PATH --id ID
    fake_vmm.py jailer --id ID --exec-file FC --uid U --gid G --chroot-base-dir DIR -- --api-sock /run/...
    fake_vmm.py cloud-hypervisor --api-socket path=PATH
Environment: FAKE_VMM_RECORD (JSON lines of requests), FAKE_VMM_FAIL (a path to answer 400).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import sys
from typing import Any

RECORD = os.environ.get("FAKE_VMM_RECORD", "/dev/null")
FAIL = os.environ.get("FAKE_VMM_FAIL", "")

FC_SCHEMAS: dict[str, tuple[dict[str, type], dict[str, type]]] = {  # required, optional
    "/machine-config": ({"vcpu_count": int, "mem_size_mib": int},
                        {"smt": bool, "track_dirty_pages": bool, "cpu_template": str, "huge_pages": str}),
    "/boot-source": ({"kernel_image_path": str}, {"boot_args": str, "initrd_path": str}),
    "/drives/": ({"drive_id": str, "is_root_device": bool},
                 {"path_on_host": str, "is_read_only": bool, "partuuid": str, "cache_type": str, "io_engine": str}),
    "/network-interfaces/": ({"iface_id": str, "host_dev_name": str}, {"guest_mac": str}),
    "/actions": ({"action_type": str}, {}),
}
CH_CONFIG_KEYS = {"cpus", "memory", "payload", "disks", "net", "rng", "serial", "console", "devices", "vsock",
                  "iommu", "platform", "balloon", "fs", "pmem", "numa", "watchdog", "pvpanic", "tpm", "landlock_enable"}
CONSOLE_MODES = {"Off", "Pty", "Tty", "File", "Socket", "Null"}
# VmConfig.devices[] (DeviceConfig in cloud-hypervisor's vm_config.rs and openapi): VFIO devices by sysfs path
CH_DEVICE_REQUIRED: dict[str, type] = {"path": str}
CH_DEVICE_OPTIONAL: dict[str, type] = {"iommu": bool, "id": str, "pci_segment": int, "x_nv_gpudirect_clique": int}


def check_ch_devices(devices: Any, num_pci_segments: int = 1) -> str | None:
    """What cloud-hypervisor refuses in `devices`: not a list, a DeviceConfig without `path` or with a wrong
    type (an unknown field too: this stand-in is stricter than serde there), an out-of-range integer
    (pci_segment is u16 and below the platform's segment count, the clique is u8), or an id used twice."""
    if not isinstance(devices, list):
        return "devices must be an array of DeviceConfig"
    ids: set[str] = set()
    for dev in devices:
        if isinstance(dev, dict):  # Option<...> fields: null is their default
            dev = {k: v for k, v in dev.items() if not (v is None and k in ("id", "x_nv_gpudirect_clique"))}
        err = check(dev, CH_DEVICE_REQUIRED, CH_DEVICE_OPTIONAL)
        if err:
            return f"invalid DeviceConfig: {err}"
        if not 0 <= dev.get("pci_segment", 0) < num_pci_segments:
            return "invalid DeviceConfig: pci_segment out of range"
        if not 0 <= dev.get("x_nv_gpudirect_clique", 0) <= 255:
            return "invalid DeviceConfig: x_nv_gpudirect_clique out of range"
        if "id" in dev:
            if dev["id"] in ids:
                return f"identifier {dev['id']} is not unique"
            ids.add(dev["id"])
    return None


def check(body: Any, required: dict[str, type], optional: dict[str, type]) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for k in required:
        if k not in body:
            return f"missing field `{k}`"
    for k, v in body.items():
        t = required.get(k) or optional.get(k)
        if t is None:
            return f"unknown field `{k}`"
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            return f"invalid type for `{k}`"
    return None


class Fake:
    def __init__(self, kind: str, root: str = "", uid: int | None = None) -> None:
        self.root = root  # the jail's chroot: API paths are inside it
        self.uid = uid
        self.kind = kind
        self.started = False
        self.created: dict[str, Any] | None = None
        self.booted = asyncio.Event()
        self.done = asyncio.Event()
        self.config: dict[str, Any] = {}

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        with open(RECORD, "a") as f:
            f.write(json.dumps({"method": method, "path": path, "body": body}) + "\n")
        if FAIL and path == FAIL:
            return 400, {"fault_message": f"injected failure on {path}"}
        return self.firecracker(method, path, body) if self.kind == "firecracker" else self.ch(method, path, body)

    def firecracker(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/":
            return 200, {"state": "Running" if self.started else "Not started", "id": "fake"}
        if method != "PUT":
            return 400, {"fault_message": "Invalid request method"}
        key = next((k for k in FC_SCHEMAS if path == k or (k.endswith("/") and path.startswith(k))), None)
        if key is None:
            return 400, {"fault_message": f"Invalid request path {path}"}
        err = check(body, *FC_SCHEMAS[key])
        if err:
            return 400, {"fault_message": err}
        if key.endswith("/") and body[("drive_id" if key == "/drives/" else "iface_id")] != path[len(key):]:
            return 400, {"fault_message": "The id from the path does not match the id from the body"}
        if key == "/actions":
            action = body["action_type"]
            if action not in ("InstanceStart", "SendCtrlAltDel", "FlushMetrics"):
                return 400, {"fault_message": f"unknown action {action}"}
            if action == "InstanceStart":
                if self.started:
                    return 400, {"fault_message": "The microVM is already running"}
                if "/boot-source" not in self.config or "/machine-config" not in self.config:
                    return 400, {"fault_message": "Cannot start microvm without kernel configuration."}
                self.started = True
                self.booted.set()
            elif action == "SendCtrlAltDel":
                if not self.started:
                    return 400, {"fault_message": "not supported before starting the microVM"}
                self.done.set()
            return 204, None
        if self.started:
            return 400, {"fault_message": "The requested operation is not supported after starting the microVM."}
        if self.root:  # jailed: every file must be inside the chroot and readable by the jailed uid
            for field in ("kernel_image_path", "initrd_path", "path_on_host"):
                if field in body:
                    inside = os.path.join(self.root, body[field].lstrip("/"))
                    if not body[field].startswith("/") or not os.path.isfile(inside):
                        return 400, {"fault_message": f"{body[field]} does not exist in the jail"}
                    if self.uid is not None and os.stat(inside).st_uid != self.uid:
                        return 400, {"fault_message": f"{body[field]} is not owned by the jailed uid"}
        if key == "/machine-config" and not 1 <= body["vcpu_count"] <= 32:
            return 400, {"fault_message": "vcpu_count out of range"}
        self.config[key if not key.endswith("/") else path] = body
        return 204, None

    def ch(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/api/v1/vm.info":
            return 200, {"state": "Running" if self.started else "Created", "config": self.created}
        if method != "PUT":
            return 405, "method not allowed"
        if path == "/api/v1/vm.create":
            if self.created is not None:
                return 500, "VM already created"
            if not isinstance(body, dict) or set(body) - CH_CONFIG_KEYS:
                return 400, f"unknown VmConfig fields {sorted(set(body) - CH_CONFIG_KEYS) if isinstance(body, dict) else body}"
            payload = body.get("payload")
            if not isinstance(payload, dict) or not (payload.get("kernel") or payload.get("firmware")):
                return 400, "payload.kernel or payload.firmware is required"
            cpus = body.get("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
            if not 1 <= cpus.get("boot_vcpus", 1) <= cpus.get("max_vcpus", cpus.get("boot_vcpus", 1)):
                return 400, "boot_vcpus must be between 1 and max_vcpus"
            if not isinstance(body.get("memory", {}).get("size", 512 << 20), int):
                return 400, "memory.size must be an integer (bytes)"
            for disk in body.get("disks", []):
                if "path" not in disk:
                    return 400, "disk path is required"
            if "devices" in body:
                segments = body.get("platform", {}).get("num_pci_segments", 1)
                err = check_ch_devices(body["devices"], segments if isinstance(segments, int) else 1)
                if err:
                    return 400, err
            for dev in ("serial", "console"):
                mode = body.get(dev, {}).get("mode", "Off")
                if mode not in CONSOLE_MODES or (mode == "Socket" and not body[dev].get("socket")):
                    return 400, f"invalid {dev} configuration"
            self.created = body
            return 204, None
        if path == "/api/v1/vm.boot":
            if self.created is None:
                return 500, "VM is not created"
            self.started = True
            self.booted.set()
            return 204, None
        if path in ("/api/v1/vm.shutdown", "/api/v1/vmm.shutdown"):
            if path.endswith("vmm.shutdown"):
                self.done.set()
            return 204, None
        return 404, "not found"


async def serve_api(fake: Fake, sock_path: str) -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await reader.readline()
            if not request:
                break
            method, path, _ = request.decode().split(" ", 2)
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            raw = await reader.readexactly(length) if length else b""
            body = json.loads(raw) if raw else None
            status, reply = fake.handle(method, path, body)
            data = b"" if reply is None else json.dumps(reply).encode()
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n"
                         f"Content-Type: application/json\r\n\r\n".encode() + data)
            await writer.drain()

    await asyncio.start_unix_server(on_conn, path=sock_path)


async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, noise: bool, fake: Fake) -> None:
    """Answer like qvm's guest init (the real init is exercised under QEMU): VOLUME and SECRET frames, then
    RUN; then power off."""
    if noise:
        writer.write(b"[    0.000000] Linux version 6.1 (fake console noise before init)\n")
    writer.write(b"READY\n")
    await writer.drain()
    while line := await reader.readline():
        if line.startswith(b"VOLUME "):  # answered, never recorded (it carries the key)
            key = line[7:].rstrip(b"\n")
            good = len(key) == 64 and all(c in b"0123456789abcdef" for c in key)
            writer.write(b"VOLUME_OK 00000000-0000-4000-8000-000000000000\n" if good else b"ERROR volume: bad key\n")
            await writer.drain()
        elif line.startswith(b"SECRET "):
            name = line.split(b" ")[1]
            writer.write(b"SECRET_OK " + name + b"\n")
            await writer.drain()
        elif line.startswith(b"RUN "):
            script = base64.b64decode(line[4:].strip()).decode()
            out = f"fake guest ran: {script}\n".encode()
            writer.write(b"OUT " + base64.b64encode(out) + b"\nEXIT 0\n")
            await writer.drain()
            fake.done.set()  # the guest powers off after EXIT, and the VMM exits with it
            return


async def main() -> None:
    kind = sys.argv[1]
    args = sys.argv[2:]
    root, uid = "", None
    if kind == "jailer":
        jail_id, exec_file = args[args.index("--id") + 1], args[args.index("--exec-file") + 1]
        uid = int(args[args.index("--uid") + 1])
        int(args[args.index("--gid") + 1])
        base = args[args.index("--chroot-base-dir") + 1]
        root = os.path.join(base, os.path.basename(exec_file), jail_id, "root")
        fc_args = args[args.index("--") + 1:]
        os.makedirs(os.path.join(root, "run"), exist_ok=True)
        sock_path = os.path.join(root, fc_args[fc_args.index("--api-sock") + 1].lstrip("/"))
        kind = "firecracker"
    elif kind == "firecracker":
        sock_path = args[args.index("--api-sock") + 1]
    else:
        sock_path = args[args.index("--api-socket") + 1].removeprefix("path=")
    fake = Fake(kind, root, uid)
    await serve_api(fake, sock_path)
    await fake.booted.wait()
    if kind == "firecracker":  # the serial console is our stdin/stdout (one socket)
        reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=os.dup(0)))
        task = asyncio.create_task(guest(reader, writer, True, fake))
    else:
        console = fake.created["console"]["socket"]  # type: ignore[index]

        async def on_console(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await guest(r, w, False, fake)

        await asyncio.start_unix_server(on_console, path=console)
        task = None
    await fake.done.wait()
    del task


if __name__ == "__main__":
    asyncio.run(main())
