#!/usr/bin/env python3
"""How long virt-dup-generator delays boot and every daemon-reload.

Makes COUNT realistic libvirt domain XML files (~3 KB, as libvirt writes
them to /etc/libvirt/qemu, one virt-dup job each), installs the generator
exactly as ``virt-dup install-units`` does (shebang = this Python, the
config path baked in) and runs it as systemd does: a fresh process with
three empty output directories and systemd's sparse environment.  Reports
the median (and min/max) wall time of RUNS runs after one warm-up, plus
the same for an empty config dir (interpreter start + imports alone) and a
bare ``python -c pass``, so the per-domain cost and the fixed cost can be
told apart.

    .venv/bin/python bench/generator.py [--count 1000] [--runs 9] [--record]

``--record`` writes the result into bench/RESULTS.md, between this script's
markers (replacing the previous result).
Target: < 0.3 s for 1,000 domains.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from virt_dup.systemd.units import GENERATOR, data_directory, render_generator  # noqa: E402

TARGET_SECONDS = 0.3
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION_START = "<!-- bench/generator.py: start -->"
SECTION_END = "<!-- bench/generator.py: end -->"

DOMAIN_TEMPLATE = """<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit {name}
or other application using the libvirt API.
-->

<domain type='kvm'>
  <name>{name}</name>
  <uuid>{domain_uuid}</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <virt-dup:instance xmlns:virt-dup="https://www.github.com/spencerharmon/virt-dup">
      <virt-dup:job uuid="{job_uuid}" schedule="{minute} 2 * * *" depth="0">
        <virt-dup:dev>vda</virt-dup:dev>
      </virt-dup:job>
    </virt-dup:instance>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <vmport state='off'/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='1' port='0x10'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0' multifunction='on'/>
    </controller>
    <controller type='sata' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:{mac}'/>
      <source network='default'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <serial type='pty'>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video>
      <model type='virtio' heads='1' primary='yes'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/>
    </video>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
  </devices>
</domain>
"""


def write_domains(directory: Path, count: int) -> int:
    """COUNT domain files; returns their mean size in bytes."""
    sizes = []
    for index in range(count):
        name = f"bench-vm{index:04d}"
        text = DOMAIN_TEMPLATE.format(
            name=name,
            domain_uuid=uuid.uuid4(),
            job_uuid=uuid.uuid4(),
            minute=index % 60,
            mac=f"{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}",
        )
        (directory / f"{name}.xml").write_text(text)
        sizes.append(len(text.encode()))
    return round(statistics.mean(sizes)) if sizes else 0


def install_generator(directory: Path, config: Path) -> Path:
    """The generator as install-units writes it: our Python, the config baked in."""
    source = (data_directory("generator") / GENERATOR).read_text()
    path = directory / GENERATOR
    path.write_text(render_generator(source, sys.executable, config))
    path.chmod(0o755)
    return path


def time_runs(argv: list[str], runs: int, output_root: Path) -> list[float]:
    """Wall times of ``runs`` fresh runs (after one warm-up), each with empty output dirs."""
    # What systemd 252 passes a system generator; nothing of ours.
    environment = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
        "SYSTEMD_SCOPE": "system",
    }
    times = []
    for run in range(runs + 1):
        outputs = [output_root / f"run{run}" / kind for kind in ("normal", "early", "late")]
        for output in outputs:
            output.mkdir(parents=True)
        start = time.perf_counter()
        result = subprocess.run(
            [*argv, *map(str, outputs)],
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{argv[0]} failed ({result.returncode}): {result.stderr}")
        if run:  # the first run warms the page cache
            times.append(elapsed)
        shutil.rmtree(output_root / f"run{run}")
    return times


def tmpfs_directory() -> Path | None:
    """A tmpfs to write the output into: systemd's output dirs are in /run, a tmpfs."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and fields[2] == "tmpfs" and fields[1] in ("/run", "/dev/shm", "/tmp"):
            candidate = Path(fields[1])
            if os.access(candidate, os.W_OK):
                return candidate
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="domain files (default 1000)")
    parser.add_argument("--runs", type=int, default=9, help="timed runs (default 9)")
    parser.add_argument("--record", action="store_true", help=f"write the result into {RESULTS}")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vd-bench-") as temporary:
        root = Path(temporary)
        domains, empty = root / "qemu", root / "empty"
        domains.mkdir()
        empty.mkdir()
        mean_size = write_domains(domains, arguments.count)
        configs = {}
        for name, directory in (("full", domains), ("empty", empty)):
            configs[name] = root / f"virt-dup-{name}.yml"
            configs[name].write_text(f"libvirt:\n  config_dir: {directory}\n")
        generator = install_generator(root, configs["full"])
        generator_empty = root / "empty-generator"
        generator_empty.write_text(
            generator.read_text().replace(str(configs["full"]), str(configs["empty"]))
        )
        generator_empty.chmod(0o755)

        tmpfs = tmpfs_directory()
        output_root = Path(tempfile.mkdtemp(prefix="vd-bench-out-", dir=tmpfs or root))
        try:
            full = time_runs([str(generator)], arguments.runs, output_root)
            fixed = time_runs([str(generator_empty)], arguments.runs, output_root)
            bare = time_runs([sys.executable, "-c", "pass"], arguments.runs, output_root)
        finally:
            shutil.rmtree(output_root, ignore_errors=True)

        check = root / "check"
        for kind in ("normal", "early", "late"):
            (check / kind).mkdir(parents=True)
        subprocess.run(
            [str(generator), *(str(check / kind) for kind in ("normal", "early", "late"))],
            check=True,
        )
        produced = len(list((check / "normal").glob("*.timer")))

    median = statistics.median(full)
    verdict = "within" if median < TARGET_SECONDS else "OVER"
    entry = "\n".join(
        [
            f"## virt-dup-generator, {arguments.count} domains — "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            "",
            f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}.",
            f"Input: {arguments.count} domain XML files, {mean_size} bytes each on average, "
            f"one job each; {produced} timers written.",
            f"Method: `bench/generator.py --count {arguments.count} --runs {arguments.runs}`; "
            "fresh process per run as systemd runs it (installed shebang, config baked in, "
            "systemd's environment), one warm-up run first; domain files on the root file "
            "system (page cache warm), output "
            + (
                f"on a tmpfs ({tmpfs}), as /run/systemd/generator is."
                if tmpfs
                else "on the root file system (no tmpfs found: slower than on a real host)."
            ),
            "",
            "| what | median wall time |",
            "|---|---|",
            f"| generator, {arguments.count} domains | {summary(full)} |",
            f"| generator, no domains (start-up + imports) | {summary(fixed)} |",
            f"| `python -c pass` | {summary(bare)} |",
            "",
            f"Target < {TARGET_SECONDS} s: **{verdict}** "
            f"({(median - statistics.median(fixed)) / max(arguments.count, 1) * 1e6:.0f} µs "
            "per domain on top of the fixed cost).",
            "",
        ]
    )
    print(entry)
    if arguments.record:
        record(entry)
    return 0


def record(entry: str) -> None:
    """Put ``entry`` between this script's markers in RESULTS.md (replacing the last one)."""
    section = f"{SECTION_START}\n{entry.rstrip()}\n{SECTION_END}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
