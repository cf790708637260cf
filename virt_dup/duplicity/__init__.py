"""The duplicity adapter: one duplicity *collection* per job.

* :mod:`.target` — where a job's collection lives, its cache and keys, and
  the environment (the only place secrets go);
* :mod:`.arguments` — command lines as tuples (pure);
* :mod:`.protocol` — the ``--log-fd`` records and the backup statistics;
* :mod:`.collection` — chains and backup sets, full-or-incremental and
  retention rules (pure);
* :mod:`.runner` — :class:`~.runner.Duplicity`, the one way duplicity is run;
* :mod:`.cache` — what an interrupted backup leaves in the cache;
* :mod:`.listing` — a backend's files, through duplicity's own backends;
* :mod:`.exits`, :mod:`.times` — exit codes, time strings.
"""
