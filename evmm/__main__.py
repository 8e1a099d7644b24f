import sys

from evmm.cli.main import main

sys.exit(main())
