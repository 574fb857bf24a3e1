"""`python -m qat_plugin_cli`: the `qat-plugin` command."""

import sys

from qat_plugin_cli import main

sys.exit(main())
