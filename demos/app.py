"""Run the Gradio demo: `python demos/app.py --model DIR` (the same options as `llama-vision demo`).

The app itself is `llama_vision.demo.build_demo(lv)`, in the package so that the installed command
works from any directory; this script only runs it.
"""

import sys

from llama_vision.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
