from minilab.cli import main

raise SystemExit(main())
