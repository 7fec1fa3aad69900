"""`python -m jaxpp.bench`: the same as `jaxpp bench`."""

import sys

from jaxpp.bench import main

sys.exit(main())
