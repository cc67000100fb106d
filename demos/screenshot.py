"""Take the README's picture of the demo (docs/demo.png): launch the demo on a checkpoint, ask a question
about a picture of the embedded model's domain in headless chromium (Playwright, the system's browser),
wait for the answer and its figures, and save a small PNG.

    python demos/screenshot.py --model DIR [--out docs/demo.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

from llama_vision import LlamaVision
from llama_vision.bundled import EXAMPLES_DIR
from llama_vision.demo import build_demo, bundled_examples, launch
from llama_vision.domain import example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, metavar="DIR")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "demo.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--index", type=int, default=0, help="which domain example to ask about")
    parser.add_argument("--max-new-tokens", type=int, help="set in the page's settings (default: its own)")
    args = parser.parse_args()

    lv = LlamaVision.from_pretrained(args.model)
    folder = Path(tempfile.mkdtemp(prefix="llama-vision-screenshot-"))
    demo = build_demo(lv, model_name=Path(args.model).resolve().name, examples=bundled_examples())
    launch(demo, port=args.port, prevent_thread_lock=True, quiet=True, allowed_paths=[str(EXAMPLES_DIR)])
    ex = example("eval", 0, args.index)
    picture = folder / "question.png"
    ex.image().save(picture)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 960, "height": 820})
        page.goto(f"http://127.0.0.1:{args.port}/")
        if args.max_new_tokens is not None:
            page.locator("#settings").get_by_role("button").first.click()
            field = page.get_by_label("number input for Max new tokens")
            field.fill(str(args.max_new_tokens))
            field.press("Enter")
            page.locator("#settings").get_by_role("button").first.click()
        page.locator("input[type=file]").first.set_input_files(str(picture))
        page.locator("textarea").first.fill(ex.qa.question)
        page.locator("textarea").first.press("Enter")
        expect(page.get_by_text("first token").first).to_be_visible(timeout=120_000)
        page.mouse.move(0, 0)  # off the messages: no hover buttons in the picture
        page.evaluate("window.scrollTo(0, 0)")
        shot = folder / "page.png"
        page.screenshot(path=str(shot))
        browser.close()
    demo.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(shot).convert("RGB").quantize(colors=128).save(args.out, optimize=True)
    print(
        f"{args.out}: {args.out.stat().st_size:,} bytes; question {ex.qa.question!r}, expected {ex.qa.answer!r}"
    )


if __name__ == "__main__":
    main()
