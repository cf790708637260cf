"""Alerts and pings: what virt-dup tells people when something needs them.

:mod:`~virt_dup.alerts.message` words an alert (pure); :mod:`~virt_dup.alerts.send`
delivers it through apprise to the URLs of virt-dup.yml's ``alerts:`` section
and pings a job's healthchecks-style URL.  Neither ever raises for a failed
delivery: an alert that cannot be sent is a journal warning, never a second
failure.
"""
