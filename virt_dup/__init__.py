"""virt-dup: systemd-native backups of libvirt/KVM qcow2 disks with duplicity."""

import os

# libvirt's client library logs its own warnings to stderr (a TLS peer whose
# certificate fails validation: three lines before virt-dup's one), and reads
# where to log once, from the environment, when libvirt-python is first
# imported: this package is imported before it.  virt-dup reports every
# libvirt error itself; LIBVIRT_LOG_OUTPUTS set by the caller wins.
os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", "4:file:/dev/null")

__version__ = "0.1.0"

#: XML namespace of virt-dup's domain metadata (kept from the original virt-dup).
NAMESPACE = "https://www.github.com/spencerharmon/virt-dup"
#: Prefix used when virt-dup writes that metadata.
NAMESPACE_PREFIX = "virt-dup"
