"""``python -m nny_models.convert`` = ``nnynet-convert``."""

import sys

from nny_models.convert import main

sys.exit(main())
