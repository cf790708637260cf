"""virt-dup.yml and the job options: the one option table, cron's meaning, loading."""
