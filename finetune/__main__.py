"""`python -m finetune` and `accelerate launch -m finetune` enter here."""

from finetune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
