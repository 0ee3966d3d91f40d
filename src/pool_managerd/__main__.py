"""``python -m pool_managerd`` runs the ``pool-managerd`` command."""

from pool_managerd.cli import main

raise SystemExit(main())
