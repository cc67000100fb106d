"""`python -m llama_vision.domain OUT_DIR --n N --seed S --split train|eval [--variant V]`."""

from .dataset import main

main()
