import sys

from ssmkit.cli.main import main

sys.exit(main())
