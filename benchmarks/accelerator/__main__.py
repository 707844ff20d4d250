"""`python3 -m benchmarks.accelerator --out DIR`: the accelerator run (the package's docstring says what it runs)."""

import sys

from benchmarks.accelerator.runner import main

sys.exit(main())
