"""Conversion of trained runs to other ecosystems (Hugging Face transformers)."""

from .huggingface import ExportError, export_hf, hf_architecture

__all__ = ["ExportError", "export_hf", "hf_architecture"]
