"""A backup run's parts: plan, overlays, manifest, run state, recovery."""
