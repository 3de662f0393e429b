"""python -m fastflow.config [--markdown | fastflow.train's arguments] (fastflow.config.docs.main)."""

from .docs import main

raise SystemExit(main())
