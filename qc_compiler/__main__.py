"""``python -m qc_compiler`` is the ``qc`` command."""
import sys

from .cli import main

sys.exit(main())
