"""Throw-away libvirt domains on the real ``qemu:///system`` daemon, for tests.

The fixtures in ``tests/integration/conftest.py`` wrap this module; tests
normally use those (``libvirt_conn``, ``make_domain``) and import only the
types from here (``DiskSpec``, ``ScratchDomain``, ``read_pattern_ok``).

What the daemon on the test machines needs (measured on Debian 12, libvirt
9.0, QEMU 7.2; see /work/shared/ENVIRONMENT.md):

* The security driver is DAC only (``secmodel none`` + ``dac``: no AppArmor
  or SELinux in the kernel) with ``dynamic_ownership`` on.  At start libvirt
  chowns every image of the chain to ``libvirt-qemu`` (64055:64055); at stop it
  restores the owner of the *top* image only (remembered in
  ``trusted.libvirt.security.*`` xattrs) and leaves backing images owned by
  ``libvirt-qemu``.  Root can still read, write and delete them.
* QEMU runs as ``libvirt-qemu``, so every directory above an image must be
  traversable by it: a 0700 directory (``mkdtemp``, pytest's ``tmp_path``)
  fails with "Cannot access storage file ... (as uid:64055, gid:64055):
  Permission denied".  Images therefore live in 0755 directories under
  ``/var/lib/libvirt/images/vdt-<session>/`` (override the parent with the
  environment variable ``VIRT_DUP_TEST_IMAGES``).
* HMP ``qemu-io`` returns nothing on the monitor: its output goes to QEMU's
  stdout, i.e. the domain log ``/var/log/libvirt/qemu/<name>.log``, which is
  where :meth:`ScratchDomain.write_pattern` checks that a write happened.
* A domain starts in ~0.3 s (KVM) but ``destroy`` takes 1.2-1.8 s: libvirt
  waits until the QEMU pid is gone, and this machine's PID 1 (not systemd)
  reaps the orphaned QEMU zombie slowly.  Teardown therefore removes all the
  domains of a test in parallel.
"""

from __future__ import annotations

import grp
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from xml.etree import ElementTree

import libvirt
import libvirt_qemu

MIB = 1024 * 1024
LIBVIRT_URI = "qemu:///system"
DEFAULT_IMAGES_PARENT = Path("/var/lib/libvirt/images")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
DEFAULT_DISK_SIZE = 64 * MIB
DEFAULT_CHAIN = ("base", "vm")
#: How long write_pattern waits for QEMU to log the result of an HMP qemu-io write.
QEMU_IO_LOG_TIMEOUT = 10.0

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_sequence = itertools.count(1)


class HarnessError(Exception):
    """The test harness could not build, drive or remove a scratch domain."""


# --- external commands ----------------------------------------------------------


def run(argv: Sequence[str | os.PathLike[str]]) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output.

    Returns the completed process.  Raises HarnessError, naming the command as
    a copy-pasteable line with its exit code and output, when it fails.
    """
    args = [os.fspath(arg) for arg in argv]
    try:
        result = subprocess.run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise HarnessError(f"{args[0]} not found; run scripts/setup") from error
    if result.returncode != 0:
        raise HarnessError(
            f"{shlex.join(args)} failed with exit code {result.returncode}:\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


def create_image(path: Path, size: int = DEFAULT_DISK_SIZE, backing: Path | None = None) -> Path:
    """Create a qcow2 image at ``path`` (absolute backing path, format qcow2).

    With ``backing`` the image is an overlay of it and inherits its size.
    Returns ``path``.  Raises HarnessError if qemu-img fails.
    """
    if backing is None:
        run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    else:
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                backing.resolve(),
                "-F",
                "qcow2",
                path,
            ]
        )
    return path


def image_chain(top: Path) -> tuple[Path, ...]:
    """Return the backing chain of ``top`` from its qcow2 headers, bottom→top.

    Works on images in use (``qemu-img info -U``).  Raises HarnessError.
    """
    result = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", top])
    return tuple(Path(image["filename"]) for image in reversed(json.loads(result.stdout)))


def read_pattern_ok(
    image: Path, pattern: int, offset: int, length: int, *, with_backing: bool = True
) -> bool:
    """Tell whether ``length`` bytes at ``offset`` of ``image`` all equal ``pattern``.

    Reads with ``qemu-io -r -U`` (safe on an image a running QEMU holds).
    With ``with_backing=False`` the backing chain is ignored, so clusters the
    image itself does not hold read as zeroes: this proves *which* file of a
    chain holds the data.  Returns False on a pattern mismatch; raises
    HarnessError when the image cannot be read at all.
    """
    command = f"read -P {_pattern_arg(pattern)} {offset} {length}"
    if with_backing:
        source = os.fspath(image)
    else:
        source = "json:" + json.dumps(
            {
                "driver": "qcow2",
                "file": {"driver": "file", "filename": os.fspath(image)},
                "backing": None,
            }
        )
    argv = ["qemu-io", "-r", "-U", "-c", command, source]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    if "Pattern verification failed" in output:
        return False
    if result.returncode == 0 and f"read {length}/{length} bytes at offset {offset}" in output:
        return True
    raise HarnessError(f"{shlex.join(argv)} failed with exit code {result.returncode}:\n{output}")


def _pattern_arg(pattern: int) -> str:
    if not 0 <= pattern <= 0xFF:
        raise HarnessError(f"pattern must be one byte (0..255), got {pattern}")
    return f"0x{pattern:02x}"


# --- libvirt ---------------------------------------------------------------------


def new_session_id() -> str:
    """Return a fresh random id (8 hex digits) that names one test session's domains."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class HarnessSession:
    """One test session: ``id`` is in the name of every domain it makes,
    ``images_root`` the directory under which all their images live.
    """

    id: str
    images_root: Path

    @classmethod
    def new(cls, parent: Path = DEFAULT_IMAGES_PARENT) -> HarnessSession:
        """Return a session with a fresh id, its images in ``parent/vdt-<id>``."""
        session_id = new_session_id()
        return cls(id=session_id, images_root=parent / f"vdt-{session_id}")


def kvm_usable(conn: libvirt.virConnect) -> bool:
    """Tell whether QEMU started by libvirt can use KVM on this host.

    True when libvirt offers ``<domain type='kvm'>`` for x86_64 and
    ``/dev/kvm`` is read-writable by group ``kvm`` or everyone (QEMU runs as
    ``libvirt-qemu``, a member of ``kvm``).
    """
    try:
        device = os.stat("/dev/kvm")
    except FileNotFoundError:
        return False
    capabilities = ElementTree.fromstring(conn.getCapabilities())
    offered = capabilities.find("./guest/arch[@name='x86_64']/domain[@type='kvm']") is not None
    group_rw = stat.S_IRGRP | stat.S_IWGRP
    others_rw = stat.S_IROTH | stat.S_IWOTH
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        kvm_gid = -1
    by_group = device.st_gid == kvm_gid and device.st_mode & group_rw == group_rw
    return offered and (by_group or device.st_mode & others_rw == others_rw)


def remove_domain(conn: libvirt.virConnect, name: str) -> None:
    """Destroy (if running) and undefine the domain ``name``, with its
    snapshot/checkpoint metadata, managed save and NVRAM.

    A domain that does not exist (any more) is not an error.  Raises
    libvirt.libvirtError for anything else.
    """
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    try:
        if domain.isActive():
            domain.destroy()
        if domain.isPersistent():
            domain.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    _remove_stale_config(conn, name)


#: Where libvirtd (qemu:///system) keeps the definitions it loads when it starts.
SYSTEM_CONFIGS = Path("/etc/libvirt/qemu")


def _remove_stale_config(conn: libvirt.virConnect, name: str) -> None:
    """Delete the definition file of a domain libvirtd no longer knows.

    Found in CI (libvirt 9.0): a domain undefined while it runs, whose disk is
    then block-committed with a pivot (test_faults' undefined-during-the-backup
    test), is left with ``/etc/libvirt/qemu/NAME.xml`` written again, though
    libvirtd lists it as transient and then as gone; the next libvirtd start
    (a disruptive test) defines it anew, after this session's sweep when the
    tests run side by side.
    """
    if conn.getURI() != LIBVIRT_URI:
        return
    config = SYSTEM_CONFIGS / f"{name}.xml"
    if not config.exists():
        return
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            config.unlink(missing_ok=True)


def remove_domains(conn: libvirt.virConnect, names: Sequence[str]) -> list[str]:
    """Remove the domains ``names`` (see :func:`remove_domain`), all at once.

    In parallel because QEMU takes 1.2-1.8 s to exit here, even on SIGKILL.
    Returns one ``domain NAME: error`` line per domain that could not be removed.
    """
    if not names:
        return []
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        futures = {name: pool.submit(remove_domain, conn, name) for name in names}
    return [
        f"domain {name}: {future.exception()}"
        for name, future in futures.items()
        if future.exception() is not None
    ]


def session_domain_names(conn: libvirt.virConnect, session_id: str) -> list[str]:
    """Return the names of all domains (running or not) made in session ``session_id``."""
    owned = re.compile(rf"^.+-{re.escape(session_id)}-\d+$")
    return sorted(domain.name() for domain in conn.listAllDomains() if owned.match(domain.name()))


def sweep_session(conn: libvirt.virConnect, session_id: str, images_root: Path) -> list[str]:
    """Remove every domain named by session ``session_id`` and its image root.

    Domains of other sessions, or not made by the harness, are never touched.
    Returns the names of the domains removed (normally none: each test's
    teardown removes its own).  Raises HarnessError listing what could not be
    removed.
    """
    names = session_domain_names(conn, session_id)
    failures = remove_domains(conn, names)
    try:
        shutil.rmtree(images_root)
    except FileNotFoundError:
        pass
    except OSError as error:
        failures.append(f"{images_root}: {error}")
    if failures:
        raise HarnessError("session sweep left things behind:\n" + "\n".join(failures))
    return names


def _make_directory(path: Path) -> Path:
    """Create ``path`` and missing parents as 0755, so that libvirt-qemu can traverse them."""
    missing = [parent for parent in (path, *path.parents) if not parent.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(0o755)
    return path


# --- the domains -----------------------------------------------------------------


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a scratch domain.

    ``target``: the guest device (``vda``, ``vdb``, ...), always on the virtio bus.
    ``chain``: image names bottom→top; each becomes ``<name>.qcow2`` (kept as
    is if it already ends in ``.qcow2``) in the disk's own directory, each an
    overlay of the previous one.  The top one is the domain's disk source.
    ``size``: virtual size in bytes of the bottom image (overlays inherit it).
    ``backing``: an existing image (e.g. another domain's base, or one from
    ``make_domain.create_image``) put under ``chain[0]``: a shared base.
    """

    target: str = "vda"
    chain: Sequence[str] = DEFAULT_CHAIN
    size: int = DEFAULT_DISK_SIZE
    backing: Path | None = None


@dataclass
class ScratchDomain:
    """A throw-away persistent domain made by :class:`DomainFactory`.

    ``name``, ``uuid``: the domain's; ``domain``: its ``libvirt.virDomain``;
    ``directory``: where its images live; ``images``: for each target dev, the
    paths of every image of its chain as created, bottom→top (a shared
    ``backing`` image included), so ``images["vda"][-1]`` is vda's source.
    """

    name: str
    uuid: str
    domain: libvirt.virDomain
    directory: Path
    images: dict[str, tuple[Path, ...]]

    @property
    def log_path(self) -> Path:
        """QEMU's log of this domain (where HMP ``qemu-io`` prints its results)."""
        return QEMU_LOG_DIR / f"{self.name}.log"

    def is_running(self) -> bool:
        """Tell whether the domain is in the ``running`` state."""
        state, _reason = self.domain.state()
        return bool(state == libvirt.VIR_DOMAIN_RUNNING)

    def xml(self, *, inactive: bool = False) -> ElementTree.Element:
        """Return the live domain XML (or, with ``inactive``, the persistent one), parsed."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return ElementTree.fromstring(self.domain.XMLDesc(flags))

    def disk_source(self, dev: str, *, inactive: bool = False) -> Path:
        """Return the current ``<source file>`` of target ``dev`` in the live XML
        (persistent XML with ``inactive``).  Raises HarnessError if there is none.
        """
        source = self._disk(dev, inactive=inactive).find("./source")
        if source is None or "file" not in source.attrib:
            raise HarnessError(f"{self.name}: disk {dev} has no <source file=...>")
        return Path(source.attrib["file"])

    def disk_chain(self, dev: str, *, inactive: bool = False) -> tuple[Path, ...]:
        """Return the chain of target ``dev`` as libvirt reports it (``<source>``
        then nested ``<backingStore>``), bottom→top.  The inactive XML usually
        carries no ``<backingStore>``; then only the source is returned.
        """
        element: ElementTree.Element | None = self._disk(dev, inactive=inactive)
        files = []
        while element is not None:
            source = element.find("./source")
            if source is None or "file" not in source.attrib:
                break
            files.append(Path(source.attrib["file"]))
            element = element.find("./backingStore")
        return tuple(reversed(files))

    def disk_alias(self, dev: str) -> str:
        """Return the qdev alias (e.g. ``virtio-disk0``) of target ``dev`` in the live XML.

        Raises HarnessError when the domain is not running (no aliases then).
        """
        alias = self._disk(dev).find("./alias")
        if alias is None:
            raise HarnessError(f"{self.name}: disk {dev} has no alias (is the domain running?)")
        return alias.attrib["name"]

    def hmp(self, command: str) -> str:
        """Send a human-monitor command to the running QEMU; return its reply."""
        reply: str = libvirt_qemu.qemuMonitorCommand(
            self.domain, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        return reply

    def write_pattern(self, disk: str, pattern: int, offset: int, length: int) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset`` through the guest's
        own virtio disk, as a guest write would, then flush it to the image.

        ``disk`` is a target dev (``vda``) or a qdev alias (``virtio-disk0``).
        Uses HMP ``qemu-io -d /machine/peripheral/<alias>/virtio-backend``; the
        domain must be running.  QEMU prints the result to the domain log, not
        the monitor, so the log is read to confirm the write.  Raises
        HarnessError if the disk is unknown, the range is outside it or QEMU
        does not confirm the write.
        """
        target, alias = self._resolve_disk(disk)
        capacity = self.domain.blockInfo(target)[0]
        if offset < 0 or length <= 0 or offset + length > capacity:
            raise HarnessError(
                f"{self.name}: {length} bytes at {offset} do not fit {target} ({capacity} bytes)"
            )
        device = f"/machine/peripheral/{alias}/virtio-backend"
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        write = f"write -P {_pattern_arg(pattern)} {offset} {length}"
        self._qemu_io(device, write)
        self._await_log(
            log_start,
            success=f"wrote {length}/{length} bytes at offset {offset}",
            what=f"qemu-io {write!r} on {target}",
        )
        self._qemu_io(device, "flush")

    def read_pattern_ok(
        self, image: Path, pattern: int, offset: int, length: int, *, with_backing: bool = True
    ) -> bool:
        """Same as the module function :func:`read_pattern_ok`."""
        return read_pattern_ok(image, pattern, offset, length, with_backing=with_backing)

    def _disk(self, dev: str, *, inactive: bool = False) -> ElementTree.Element:
        disk = self.xml(inactive=inactive).find(f"./devices/disk/target[@dev='{dev}']/..")
        if disk is None:
            raise HarnessError(f"{self.name}: no disk with target dev {dev!r}")
        return disk

    def _resolve_disk(self, disk: str) -> tuple[str, str]:
        for element in self.xml().findall("./devices/disk"):
            target = element.find("./target")
            alias = element.find("./alias")
            if target is None or alias is None:
                continue
            if disk in (target.attrib["dev"], alias.attrib["name"]):
                if target.attrib.get("bus") != "virtio":
                    raise HarnessError(f"{self.name}: disk {disk} is not a virtio disk")
                return target.attrib["dev"], alias.attrib["name"]
        raise HarnessError(f"{self.name}: no disk {disk!r} with an alias (is it running?)")

    def _qemu_io(self, device: str, command: str) -> None:
        reply = self.hmp(f"qemu-io -d {device} {json.dumps(command)}")
        if reply.strip():
            raise HarnessError(f"{self.name}: qemu-io {command!r} on {device}: {reply.strip()}")

    def _await_log(self, start: int, *, success: str, what: str) -> None:
        deadline = time.monotonic() + QEMU_IO_LOG_TIMEOUT
        while True:
            try:
                with self.log_path.open("rb") as log:
                    log.seek(start)
                    text = log.read().decode(errors="replace")
            except FileNotFoundError:
                text = ""
            if success in text:
                return
            failure = re.search(r"^(write|flush) failed: .*$", text, re.MULTILINE)
            if failure:
                raise HarnessError(f"{self.name}: {what}: {failure.group(0)}")
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name}: {what}: no {success!r} in {self.log_path} "
                    f"after {QEMU_IO_LOG_TIMEOUT:.0f}s"
                )
            time.sleep(0.02)


class DomainFactory:
    """Makes scratch domains and removes them all again.

    ``conn``: an open ``qemu:///system`` connection; ``session_id``: put in
    every domain name (``<prefix>-<session_id>-<n>``) so that a session sweep
    finds them; ``directory``: a fresh directory (created 0755) for all the
    images of this factory; ``label``: put into each domain's
    ``<description>`` (the test's node id).

    Use as a context manager, or call :meth:`cleanup`: it destroys and
    undefines every domain made here, then deletes ``directory``.
    """

    def __init__(
        self, conn: libvirt.virConnect, session_id: str, directory: Path, label: str = ""
    ) -> None:
        self.conn = conn
        self.session_id = session_id
        self.directory = directory
        self.label = label
        self.domains: list[ScratchDomain] = []
        self._domain_type = "kvm" if kvm_usable(conn) else "qemu"

    @property
    def domain_type(self) -> str:
        """``kvm`` when KVM is usable by QEMU here, else ``qemu`` (TCG)."""
        return self._domain_type

    def __call__(
        self,
        name_prefix: str = "vdt",
        disks: Sequence[str | DiskSpec] = ("vda",),
        running: bool = True,
        chain: Sequence[str] = DEFAULT_CHAIN,
        size: int = DEFAULT_DISK_SIZE,
        guest_agent_channel: bool = False,
    ) -> ScratchDomain:
        """Create, define and (with ``running``) start a scratch domain.

        ``disks``: target devs (each gets ``chain`` and ``size``) or
        :class:`DiskSpec` for per-disk chains, sizes and shared bases.
        ``guest_agent_channel`` adds an ``org.qemu.guest_agent.0`` channel
        (no guest answers on it: "agent not connected").
        The domain has 64 MiB RAM, 1 vCPU, machine ``pc``, virtio disks, no
        network, no graphics; it boots into SeaBIOS and stays ``running``.
        Returns the :class:`ScratchDomain`.  Raises HarnessError or
        libvirt.libvirtError; what was made so far is still removed by
        :meth:`cleanup`.
        """
        if not _NAME_PART.match(name_prefix):
            raise HarnessError(f"name_prefix {name_prefix!r}: use letters, digits, '_.-'")
        specs = [
            DiskSpec(target=disk, chain=chain, size=size) if isinstance(disk, str) else disk
            for disk in disks
        ]
        targets = [spec.target for spec in specs]
        if len(set(targets)) != len(targets):
            raise HarnessError(f"duplicate disk targets: {targets}")
        name = f"{name_prefix}-{self.session_id}-{next(_sequence):03d}"
        directory = _make_directory(self.directory / name)
        images = {spec.target: self._create_chain(directory / spec.target, spec) for spec in specs}
        xml = domain_xml(
            name,
            {target: chain[-1] for target, chain in images.items()},
            domain_type=self._domain_type,
            description=f"virt-dup test domain ({self.label})",
            guest_agent_channel=guest_agent_channel,
        )
        domain = self.conn.defineXML(xml)
        scratch = ScratchDomain(
            name=name,
            uuid=domain.UUIDString(),
            domain=domain,
            directory=directory,
            images=images,
        )
        self.domains.append(scratch)
        if running:
            domain.create()
        return scratch

    def create_image(
        self, name: str, size: int = DEFAULT_DISK_SIZE, backing: Path | None = None
    ) -> Path:
        """Create ``<name>.qcow2`` in this factory's ``shared`` directory, e.g. a
        base for several domains (``DiskSpec(backing=...)``).  Returns its path.
        """
        shared = _make_directory(self.directory / "shared")
        return create_image(shared / _image_file_name(name), size, backing)

    def cleanup(self) -> None:
        """Destroy and undefine every domain made here, then delete the directory.

        Tries everything; raises HarnessError listing what failed.
        """
        failures = remove_domains(self.conn, [scratch.name for scratch in self.domains])
        self.domains.clear()
        try:
            shutil.rmtree(self.directory)
        except FileNotFoundError:
            pass
        except OSError as error:
            failures.append(f"{self.directory}: {error}")
        if failures:
            raise HarnessError("teardown left things behind:\n" + "\n".join(failures))

    def __enter__(self) -> DomainFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _create_chain(self, directory: Path, spec: DiskSpec) -> tuple[Path, ...]:
        if not spec.chain:
            raise HarnessError(f"disk {spec.target}: chain must name at least one image")
        _make_directory(directory)
        backing = spec.backing
        for image_name in spec.chain:
            backing = create_image(directory / _image_file_name(image_name), spec.size, backing)
        assert backing is not None
        return image_chain(backing)


def _image_file_name(name: str) -> str:
    if not _NAME_PART.match(name):
        raise HarnessError(f"image name {name!r}: use letters, digits, '_.-'")
    return name if name.endswith(".qcow2") else f"{name}.qcow2"


def domain_xml(
    name: str,
    disks: dict[str, Path],
    *,
    domain_type: str = "kvm",
    description: str = "",
    guest_agent_channel: bool = False,
) -> str:
    """Return the XML of a minimal domain with the qcow2 ``disks`` ({target dev: file}).

    64 MiB, 1 vCPU, machine ``pc``, virtio disks, no network/graphics/USB/balloon.
    """
    root = ElementTree.Element("domain", type=domain_type)
    ElementTree.SubElement(root, "name").text = name
    ElementTree.SubElement(root, "description").text = description
    ElementTree.SubElement(root, "memory", unit="MiB").text = "64"
    ElementTree.SubElement(root, "vcpu").text = "1"
    os_element = ElementTree.SubElement(root, "os")
    ElementTree.SubElement(os_element, "type", arch="x86_64", machine="pc").text = "hvm"
    ElementTree.SubElement(os_element, "boot", dev="hd")
    devices = ElementTree.SubElement(root, "devices")
    for target, source in disks.items():
        disk = ElementTree.SubElement(devices, "disk", type="file", device="disk")
        ElementTree.SubElement(disk, "driver", name="qemu", type="qcow2")
        ElementTree.SubElement(disk, "source", file=os.fspath(source))
        ElementTree.SubElement(disk, "target", dev=target, bus="virtio")
    ElementTree.SubElement(devices, "controller", type="usb", model="none")
    ElementTree.SubElement(devices, "memballoon", model="none")
    if guest_agent_channel:
        channel = ElementTree.SubElement(devices, "channel", type="unix")
        ElementTree.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    return ElementTree.tostring(root, encoding="unicode")


def restart_libvirtd(require: Callable[[bool, str], None]) -> None:
    """Stop the libvirtd that scripts/setup started (by its pid file) and start it again.

    Every connection to it dies; the domains keep running.
    """
    pid_file = Path("/run/libvirtd.pid")
    require(pid_file.exists(), "libvirtd was not started by scripts/setup (no /run/libvirtd.pid)")
    pid = int(pid_file.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"libvirtd (pid {pid}) did not stop"
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 60
    while subprocess.run(
        ["virsh", "-c", "qemu:///system", "version"], capture_output=True, check=False
    ).returncode:
        assert time.monotonic() < deadline, "libvirtd did not come back"
        time.sleep(0.2)
