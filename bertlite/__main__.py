import sys

from bertlite.cli import main

sys.exit(main())
