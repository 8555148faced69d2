"""qlora-loop: a QLoRA fine-tuning loop written out in plain PyTorch."""
