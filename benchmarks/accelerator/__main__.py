"""`python -m benchmarks.accelerator`: the accelerator run (the package's docstring says what it measures)."""

import sys

from benchmarks.accelerator.runner import main

sys.exit(main())
