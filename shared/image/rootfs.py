"""Root filesystems for guests: from a directory, or from a container image saved as a tarball
(`docker save`, or an OCI image layout in a tar), written as a read-only ext4 image with `mkfs.ext4 -d`.

Layers are applied in order with OCI whiteouts (`.wh.<name>` deletes, `.wh..wh..opq` empties a
directory). Extraction uses tarfile's `tar` filter: nothing is written outside the target directory,
even through symlinks, and setuid bits are dropped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from shared.image.manifest import ImageError

__all__ = ["add_busybox", "apply_container_tar", "make_ext4"]

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def _layer_paths(tar: tarfile.TarFile) -> list[str]:
    names = set(tar.getnames())
    if "manifest.json" in names:  # docker save
        manifest = _json(tar, "manifest.json")
        if not isinstance(manifest, list) or not manifest or "Layers" not in manifest[0]:
            raise ImageError("bad_container_image", "manifest.json has no Layers")
        return [str(layer) for layer in manifest[0]["Layers"]]
    if "index.json" in names:  # OCI image layout
        index = _json(tar, "index.json")
        digest = index["manifests"][0]["digest"]
        manifest = _json(tar, _blob(digest))
        if "manifests" in manifest:  # an index of platform manifests: take the first
            manifest = _json(tar, _blob(manifest["manifests"][0]["digest"]))
        return [_blob(layer["digest"]) for layer in manifest["layers"]]
    raise ImageError("bad_container_image", "neither a `docker save` tarball nor an OCI image layout")


def _blob(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not hexdigest.isalnum():
        raise ImageError("bad_container_image", f"unsupported digest {digest[:80]!r}")
    return f"blobs/sha256/{hexdigest}"


def _json(tar: tarfile.TarFile, name: str) -> Any:
    f = tar.extractfile(name)
    if f is None:
        raise ImageError("bad_container_image", f"{name} missing")
    try:
        return json.loads(f.read(16 << 20))
    except ValueError as exc:
        raise ImageError("bad_container_image", f"{name}: {exc}") from None


def apply_container_tar(image_tar: Path, target: Path) -> int:
    """Unpack every layer of the image into `target`; returns the number of layers."""
    try:
        with tarfile.open(image_tar) as outer:
            layers = _layer_paths(outer)
            for name in layers:
                member = outer.extractfile(name)
                if member is None:
                    raise ImageError("bad_container_image", f"layer {name} missing")
                with tarfile.open(fileobj=member, mode="r|*") as layer:
                    _apply_layer(layer, target)
    except (OSError, tarfile.TarError, KeyError) as exc:
        raise ImageError("bad_container_image", f"{image_tar.name}: {exc}") from None
    return len(layers)


def _apply_layer(layer: tarfile.TarFile, target: Path) -> None:
    for member in layer:
        path = PurePosixPath(member.name.lstrip("/"))
        if ".." in path.parts:
            raise ImageError("bad_container_image", f"path escapes the root: {member.name[:200]}")
        base = path.name
        if base == OPAQUE:
            directory = target / path.parent
            if directory.is_dir() and not directory.is_symlink():
                for child in directory.iterdir():
                    _remove(child)
            continue
        if base.startswith(WHITEOUT):
            _remove(target / path.parent / base[len(WHITEOUT):])
            continue
        dest = target / path
        if dest.is_symlink() or (dest.exists() and not (dest.is_dir() and member.isdir())):
            _remove(dest)
        try:
            layer.extract(member, target, filter="tar")
        except tarfile.FilterError as exc:
            raise ImageError("bad_container_image", str(exc)[:300]) from None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def add_busybox(target: Path, busybox: Path) -> None:
    """Give a root that has no shell one: busybox and its applets under /bin."""
    bindir = target / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, bindir / "busybox")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = bindir / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("busybox")


def make_ext4(source: Path, image: Path, label: str = "qvm-root") -> None:
    """An ext4 image holding `source`, sized to its content plus headroom."""
    used = sum(p.lstat().st_size for p in source.rglob("*"))
    size_mib = max(16, int(used * 1.3 / (1 << 20)) + 16)
    image.unlink(missing_ok=True)
    proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d", str(source),
                           str(image), f"{size_mib}M"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError("rootfs_build_failed", proc.stderr.strip()[:500])
