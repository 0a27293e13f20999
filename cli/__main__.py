import sys

from langadapt.cli.main import main

sys.exit(main())
