"""`python -m cntlora.cli`, the same as the `cntlora` command."""

import sys

from . import main

sys.exit(main())
