from virt_dup.cli.main import main

raise SystemExit(main())
