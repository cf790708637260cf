"""What the integration tests stand on: scratch domains on the real libvirtd
(:mod:`.domains`), a backup environment with a real GnuPG key and file://
backend (:mod:`.backups`), and a real ``systemd --user`` manager in a private
mount namespace (:mod:`.manager`)."""
