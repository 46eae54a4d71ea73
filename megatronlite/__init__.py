"""megatronlite: Megatron-style GPT pretraining in a codebase small enough to read in an afternoon."""

from megatronlite.checkpoint.model_loader import load_model

__all__ = ["load_model"]
