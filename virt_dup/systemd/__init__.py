"""systemd: the manager (pystemd), cron as OnCalendar=, the generator, units, journal."""
