import sys

from codistill.prepare.cli import main

sys.exit(main())
