"""scripts/install: the tree it makes is a host's virt-dup, and it is safe to run again.

The session's ``installation`` is ``scripts/install --root`` of this
checkout into a scratch tree (real pip, Debian's python3, the real wheels of
libvirt-python, systemd-python, pystemd and duplicity).  Its files are
checked where a host has them; its commands run from ``/opt/virt-dup`` in
a private mount namespace (harness.install.run_installed), that is, at the
path the venv was made for: proof that nothing in it names the scratch tree.
The second run and ``--uninstall`` work on a copy, so that the session's
tree stays pristine for the systemd tests.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from harness.install import VIRT_DUP, Installation, run_install, run_installed

from virt_dup import __version__

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]
UNITS = Path("/etc/systemd/system")
PAGES = (
    "/usr/local/share/man/man8/virt-dup.8",
    "/usr/local/share/man/man8/virt-dup-generator.8",
    "/usr/local/share/man/man5/virt-dup.yml.5",
)
COMPLETION = "/usr/share/bash-completion/completions/virt-dup"
CONFIG = "/etc/virt-dup/virt-dup.yml"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def files_naming(root: Path, text: str) -> list[Path]:
    needle = text.encode()
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    ]


def test_the_scratch_tree_holds_a_working_virt_dup_at_the_hosts_paths(
    installation: Installation,
) -> None:
    tree = installation.path
    # Nothing on this host was asked of apt or systemd; the script says what it skipped.
    assert "skipped (--root): apt-get install" in installation.output
    assert "skipped (--root): systemctl daemon-reload" in installation.output
    assert files_naming(installation.root, str(installation.root)) == []

    # The command, on PATH, and the venv it runs.
    assert os.readlink(tree("/usr/local/bin/virt-dup")) == str(VIRT_DUP)
    assert tree(VIRT_DUP).read_text().startswith("#!/opt/virt-dup/bin/python\n")
    pyvenv = tree("/opt/virt-dup/pyvenv.cfg").read_text()
    assert "command = /usr/bin/python3 -m venv /opt/virt-dup\n" in pyvenv
    version = run_installed(installation, [str(VIRT_DUP), "--version"])
    assert version.returncode == 0, version.stderr
    assert __version__ in version.stdout
    duplicity = run_installed(installation, ["/opt/virt-dup/bin/duplicity", "--version"])
    assert duplicity.stdout.startswith("duplicity 3."), duplicity.stdout + duplicity.stderr
    sftp = run_installed(installation, ["/opt/virt-dup/bin/python", "-c", "import paramiko"])
    assert sftp.returncode == 0, sftp.stderr  # the default extra

    # The example configuration, root-only; the installed check-config reads
    # it, and says its placeholder key is none (the first failure is not at 02:00).
    config = tree(CONFIG)
    assert config.read_text() == (REPOSITORY / "examples" / "virt-dup.yml").read_text()
    assert mode(config) == 0o600 and config.stat().st_uid == 0
    syntax = [str(VIRT_DUP), "--config", str(config), "check-config", "--syntax-only"]
    checked = run_installed(installation, syntax)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = run_installed(installation, syntax[:-1])
    assert checked.returncode == 1
    assert "is the placeholder of the example configuration" in checked.stderr
    assert "virt-dup init" in checked.stderr

    # Manual pages that man renders, and the completion bash loads.
    for page in PAGES:
        assert mode(tree(page)) == 0o644
        rendered = subprocess.run(
            ["man", "-l", "-P", "cat", str(tree(page))],
            capture_output=True,
            text=True,
            env={**os.environ, "MANWIDTH": "80"},
            check=False,
        )
        assert rendered.returncode == 0 and "NAME" in rendered.stdout, rendered.stderr
    assert mode(tree(COMPLETION)) == 0o644
    completion = subprocess.run(
        ["bash", "-c", f"source {tree(COMPLETION)} && complete -p virt-dup"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completion.returncode == 0, completion.stderr
    assert "virt-dup" in completion.stdout

    # Units and generator where an admin's go, running the installed copy;
    # every Documentation= page is one the tree installed.
    service = tree(UNITS / "virt-dup@.service").read_text()
    assert "ExecStart=/opt/virt-dup/bin/virt-dup run %i\n" in service
    generator = tree("/etc/systemd/system-generators/virt-dup-generator")
    assert generator.read_text().startswith("#!/opt/virt-dup/bin/python\n")
    assert mode(generator) == 0o755
    pages = {Path(page).name for page in PAGES}
    documented = set()
    for unit in tree(UNITS).glob("virt-dup*"):
        if unit.is_file():
            for line in unit.read_text().splitlines():
                if line.startswith("Documentation="):
                    documented.update(line.removeprefix("Documentation=").split())
    assert documented, "the units name their manual pages"
    for reference in documented:
        name, _, section = reference.removeprefix("man:").rstrip(")").partition("(")
        assert f"{name}.{section}" in pages, reference
    link = tree(UNITS / "timers.target.wants" / "virt-dup.target")
    assert os.readlink(link) == str(UNITS / "virt-dup.target")
    assert (installation.root / os.readlink(link).lstrip("/")).is_file()


def test_a_second_run_keeps_the_config_and_uninstall_keeps_config_and_state(
    installation: Installation, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(installation.root, root, symlinks=True)
    tree = Installation(root, "").path
    config = tree(CONFIG)
    config.write_text(config.read_text() + "# changed by the admin\n")
    state = tree("/var/lib/virt-dup/status")
    state.mkdir(parents=True)
    (state / "keep.json").write_text("{}")
    local_drop_in = tree(UNITS / "virt-dup@.service.d" / "90-local.conf")
    local_drop_in.write_text("[Service]\nNice=5\n")
    before = sorted(str(path.relative_to(root)) for path in root.rglob("*"))

    again = run_install(root)

    assert f"configuration: kept {CONFIG}" in again.stdout
    assert config.read_text().endswith("# changed by the admin\n")
    assert mode(config) == 0o600
    after = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    assert after == before  # the same tree (no leftovers of the swapped venv)
    assert files_naming(root, str(root)) == []

    removed = run_install(root, "--uninstall")

    assert "skipped (--root): systemctl daemon-reload" in removed.stdout
    assert not tree("/usr/local/share/doc/virt-dup").exists()
    left = sorted(str(path.relative_to(root)) for path in root.rglob("*") if not path.is_dir())
    assert left == [
        "etc/systemd/system/virt-dup@.service.d/90-local.conf",  # the admin's, kept
        "etc/virt-dup/virt-dup.yml",
        "var/lib/virt-dup/status/keep.json",
    ]
    assert config.read_text().endswith("# changed by the admin\n")
    assert run_install(root, "--uninstall").returncode == 0  # nothing left to remove: fine
