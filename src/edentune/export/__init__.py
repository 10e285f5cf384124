"""Export a trained adapter to Ollama: GGUF LoRA (main route) or merged GGUF (fallback), with
Modelfiles checked against training, llama.cpp parity checks, and deployment over Ollama's API.

Heavy libraries (torch, transformers, llama_cpp) are imported inside the functions.
"""

from .api import ExportResult, export_adapter, export_merged

__all__ = ["ExportResult", "export_adapter", "export_merged"]
