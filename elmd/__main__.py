from elmd.cli import main

raise SystemExit(main())
