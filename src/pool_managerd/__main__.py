"""``python -m pool_managerd`` runs the ``pool-managerd`` command."""

from pool_managerd.cli.main import main

raise SystemExit(main())
