import sys

from codistill.experiment.cli import main

sys.exit(main())
