"""finetune: LoRA fine-tuning of Hugging Face models from one YAML job.

Nothing heavy is imported here: `finetune --help` and config validation must answer without torch.
"""

__version__ = "0.1.0"
