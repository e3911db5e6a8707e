"""`python -m protoformer.cli`: the same as the `protoformer` command."""

import sys

from protoformer.cli import main

sys.exit(main())
