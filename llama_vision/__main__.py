"""`python -m llama_vision ...` runs the command line, as `llama-vision ...` does."""

import sys

from llama_vision.entry import main

sys.exit(main())
