import sys

from dallm.cli import main

sys.exit(main())
