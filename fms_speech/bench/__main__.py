"""`python -m fms_speech.bench`: the same as `fms-speech bench`."""

import sys

from fms_speech.bench.cli import main

sys.exit(main())
