"""`python -m jaxpp.cli` is the `jaxpp` command."""

import sys

from jaxpp.cli.app import main

sys.exit(main())
