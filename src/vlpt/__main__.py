import sys

from vlpt.cli import main

sys.exit(main())
