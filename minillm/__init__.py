"""minillm: a minimal, readable transformer framework (GPT-2 and LLaMA families)."""

__version__ = "0.1.0"
