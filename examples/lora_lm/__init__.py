"""A GPT-2-style language model fine-tuned with LoRA on synthetic instruction domains (see app.py)."""
