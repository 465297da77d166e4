"""python -m launch VERB ...: see launch.cli."""

from launch.cli import main

raise SystemExit(main())
