import sys

from evmm.oci.cli import main

sys.exit(main())
