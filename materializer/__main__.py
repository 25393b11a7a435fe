from materializer.cli import main

raise SystemExit(main())
