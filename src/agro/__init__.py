"""agro: RL fine-tuning of LLMs from any-generation data with AGRO."""
__version__ = "0.1.0"
