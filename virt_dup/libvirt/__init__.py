"""libvirt: the one connection wrapper, the domain XML model, the jobs in <metadata>."""
