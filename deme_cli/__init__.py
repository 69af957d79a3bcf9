"""deme: Decouple-then-Merge finetuning of diffusion models."""
__version__ = "0.1.0"
