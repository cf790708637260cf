"""virt-dup: systemd-native backups of libvirt/KVM qcow2 disks with duplicity."""

__version__ = "0.1.0"

#: XML namespace of virt-dup's domain metadata (kept from the original virt-dup).
NAMESPACE = "https://www.github.com/spencerharmon/virt-dup"
#: Prefix used when virt-dup writes that metadata.
NAMESPACE_PREFIX = "virt-dup"
