"""How often stock transformers, loading the embedded model's directory as it is, gives the same greedy
answer as ours on chat prompts (its two deviations from Meta included: README, "Known differences").

    python bench/embedded_hf_agreement.py [--model DIR] [--n 64]

The questions are the accuracy benchmark's (evaluation split, seed 0). tests/test_bundled.py checks the
exact agreement of greedy tokens once those deviations are set aside.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from llama_vision import LlamaVision
from llama_vision.bundled import EMBEDDED_DIR
from llama_vision.domain import example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_DIR))
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    lv = LlamaVision.from_pretrained(args.model)
    model = transformers.MllamaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = transformers.AutoProcessor.from_pretrained(args.model)
    stop = list(lv.generation_config.eos_token_ids)
    same = 0
    for i in range(args.n):
        q = example("eval", 0, i)
        image = q.image()
        messages = q.messages(image)[:1]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=48, eos_token_id=stop)
        theirs = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        same += theirs == lv.chat(messages, temperature=0.0, max_new_tokens=48)
    print(
        f"transformers {transformers.__version__}, chat prompts: the same greedy answer for {same} of {args.n}"
    )


if __name__ == "__main__":
    main()
