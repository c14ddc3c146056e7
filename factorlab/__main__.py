import sys

from factorlab.cli import main

sys.exit(main())
