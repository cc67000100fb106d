"""An OpenAI-compatible HTTP server for Llama 3.2 Vision: `create_app(lv, Settings(...))`, served by
`llama-vision serve` (cli_serve.py). Needs the `serve` extra: pip install 'llama-vision[serve]'."""

from llama_vision.server.app import create_app
from llama_vision.server.media import MediaLoader
from llama_vision.server.settings import Settings

__all__ = ["MediaLoader", "Settings", "create_app"]
