"""Recovery fine-tuning of a compressed model (train.py): factors only, LoRA, GGPO (lora.py).
May import: errors, modeling, data, eval."""
