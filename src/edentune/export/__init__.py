"""Export a trained adapter to Ollama: GGUF LoRA (main route) or merged GGUF (fallback), with
Modelfiles checked against training, llama.cpp parity checks, and deployment over Ollama's API.

Heavy libraries (torch, transformers, llama_cpp) are imported inside the functions.
"""

from edentune.evaluate.backends import set_served_provider

from . import served
from .api import ExportResult, export_adapter, export_merged

set_served_provider(served)  # the gguf evaluation backend scores the files this stage serves

__all__ = ["ExportResult", "export_adapter", "export_merged"]
