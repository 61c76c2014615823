"""`python -m planner.cli`: the `meshplan` command."""
import sys

from planner.cli import main

sys.exit(main())
