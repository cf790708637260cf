"""The ``virt-dup`` command: arguments, completion, and each verb's handler (:mod:`.main`)."""
