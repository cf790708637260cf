"""Disk images: backing chains and depth selection (chain), qemu-img (qemu_img)."""
