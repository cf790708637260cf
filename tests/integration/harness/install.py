"""virt-dup installed as on a host, without touching this one.

:func:`install_tree` runs ``scripts/install --root DIR``: the checkout
installed into a scratch tree (``DIR/opt/virt-dup``, ``DIR/etc/...``)
whose files name the host's paths.  :func:`start_user_manager
<harness.manager.start_user_manager>` with ``installation=DIR`` mounts that
``/opt/virt-dup`` on the real path inside the manager's namespace only, so
``/opt/virt-dup/bin/virt-dup install-units`` there runs as on a host.

The session fixture ``installation`` (tests/integration/conftest.py) makes
one tree for the whole test session: building the venv takes ~20 s with
pip's cache of the wheels scripts/setup built.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[3]
SCRIPT = REPOSITORY / "scripts" / "install"
#: Where the installed virt-dup lives on a host (and in a manager's namespace).
VENV = Path("/opt/virt-dup")
VIRT_DUP = VENV / "bin" / "virt-dup"
INSTALL_TIMEOUT = 900.0


class InstallError(Exception):
    """scripts/install failed."""


@dataclass(frozen=True)
class Installation:
    """A scratch tree made by ``scripts/install --root``; ``output`` is what it printed."""

    root: Path
    output: str

    def path(self, host_path: str | os.PathLike[str]) -> Path:
        """Where the host's ``host_path`` lies in the tree."""
        return self.root / Path(host_path).relative_to("/")

    @property
    def venv(self) -> Path:
        return self.path(VENV)


def run_install(root: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``scripts/install --root ROOT ARGUMENTS``; raises InstallError with its output."""
    argv = [str(SCRIPT), "--root", str(root), *arguments]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise InstallError(
            f"{' '.join(argv)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


def install_tree(root: Path) -> Installation:
    """Install this checkout into ``root`` (created when missing)."""
    result = run_install(root)
    return Installation(root=root, output=result.stdout + result.stderr)


def run_installed(
    installation: Installation, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a private mount namespace where ``/opt/virt-dup`` is the
    tree's, as a host with virt-dup installed would (no check of the exit code)."""
    script = mount_script() + 'exec "$@"\n'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
        env={**os.environ, **(env or {}), **mount_environment(installation.root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def mount_environment(root: Path) -> dict[str, str]:
    return {"VDT_INSTALL_ROOT": str(root), "VDT_VENV": str(VENV)}


def mount_script() -> str:
    """Shell that puts ``$VDT_INSTALL_ROOT/opt/virt-dup`` on ``/opt/virt-dup``
    (run inside a private mount namespace).  /opt/virt-dup need not exist on
    this machine: /opt becomes a tmpfs holding its old entries, bound back,
    plus the mount point."""
    return r"""
if [ -n "${VDT_INSTALL_ROOT:-}" ]; then
    opt=$(dirname "$VDT_VENV")
    saved=$(mktemp -d /run/vdt-opt-XXXXXX)
    mount --bind "$opt" "$saved"
    mount -t tmpfs -o mode=0755 tmpfs "$opt"
    for entry in "$saved"/* "$saved"/.[!.]*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        name=${entry##*/}
        if [ -d "$entry" ] && [ ! -L "$entry" ]; then
            mkdir "$opt/$name"
        else
            touch "$opt/$name"
        fi
        mount --bind "$entry" "$opt/$name"
    done
    umount "$saved"
    rmdir "$saved"
    mkdir -p "$VDT_VENV"
    mount --bind "$VDT_INSTALL_ROOT$VDT_VENV" "$VDT_VENV"
fi
"""
