"""`python -m codistill.tune`: the sweep command, where the README and scripts call it (codistill/sweeps/tune.py)."""

import sys

from codistill.sweeps.tune import main

if __name__ == "__main__":
    sys.exit(main())
