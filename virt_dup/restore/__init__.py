"""Restores: the plan (pure), the workspace on disk, where the backups are (sources)."""
