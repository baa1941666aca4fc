"""One-line errors for the stage scripts (pretrain/run.py, finetune/run.py, the pipeline, publish), as
nnynet-predict prints them: a problem with what the user gave (a missing folder, a bad flag value, a file that is
not a CT, an output folder in use, a run that diverged) ends as ``PROG: error: MESSAGE`` on stderr with exit
code 2, instead of a traceback whose last line holds the message. Other exceptions are bugs and keep their
traceback, and ``NNYNET_DEBUG=1`` shows it for these too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from nny_models.training.checkpoints import CheckpointError, DivergedError
from nny_models.training.files import OutputDirInUse

EXIT_BAD_INPUT = 2
# what the engine and the readers raise for bad input; OSError covers missing files and unwritable folders
USER_ERRORS = (ValueError, OSError, ImportError, CheckpointError, DivergedError, OutputDirInUse)


def run_main(main: Callable[[], Any], prog: str) -> None:
    """Call ``main()``; a user error exits with one line ``PROG: error: ...`` and code 2 (the traceback with
    NNYNET_DEBUG=1)."""
    if os.environ.get("NNYNET_DEBUG"):
        main()
        return
    try:
        main()
    except USER_ERRORS as err:
        message = str(err).strip() or type(err).__name__
        print(f"{prog}: error: {message} (NNYNET_DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
