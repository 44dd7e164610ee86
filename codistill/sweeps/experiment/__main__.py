import sys

from codistill.sweeps.experiment.cli import main

sys.exit(main())
