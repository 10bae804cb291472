import sys

from lockgate.cli import main

sys.exit(main())
