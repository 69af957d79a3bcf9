"""deme: Decouple-then-Merge finetuning of diffusion models.

`from deme_cli import load_pipeline` gives a run's models as diffusers pipelines (api.py); it is imported on first
use, so `import deme_cli` (and `deme --help`) stays free of torch.
"""
__version__ = "0.1.0"
__all__ = ["load_pipeline", "__version__"]


def __getattr__(name: str):
    if name == "load_pipeline":
        from .api import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'deme_cli' has no attribute '{name}'")
