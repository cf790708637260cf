from virt_dup.cli import main

raise SystemExit(main())
