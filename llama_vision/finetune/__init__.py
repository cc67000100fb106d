"""Fine-tuning Llama 3.2 Vision: data (data.py), collation with label masks (collate.py), LoRA and
PEFT adapters (lora.py), the memory plan (memory.py), the training loop with checkpoints and
evaluation (train.py), and evaluation by exact match (evaluate.py). `llama-vision finetune`, `merge` and
`eval` (cli_finetune.py) and `recipes/*.yaml` sit on top.

Optional dependencies (`pip install 'llama-vision[finetune]'`): peft for LoRA, pyyaml for recipes,
datasets for datasets directories, bitsandbytes for QLoRA; each is imported only when used.
"""
