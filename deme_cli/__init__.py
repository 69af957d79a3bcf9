"""deme: Decouple-then-Merge finetuning of diffusion models.

`from deme_cli import load_pipeline` gives a run's models as diffusers pipelines (api.py); it is imported on first
use, so `import deme_cli` (and `deme --help`) stays free of torch. `deme_cli.__version__` is the installed
distribution's version (pyproject.toml's `version`, the one place it is written; `deme --version` prints it).
"""
__all__ = ["load_pipeline", "__version__"]


def __getattr__(name: str):
    if name == "load_pipeline":
        from .api import load_pipeline

        return load_pipeline
    if name == "__version__":
        from .engine.environment import deme_version

        return deme_version()
    raise AttributeError(f"module 'deme_cli' has no attribute '{name}'")
