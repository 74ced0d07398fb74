"""After training: the adapter folder (read, load, fit check), save and verify, merge, GGUF export, serving
compatibility rules, publishing with a model card, and the run record."""
