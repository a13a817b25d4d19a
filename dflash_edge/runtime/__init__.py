"""The torch-free runtime: numpy, onnxruntime and tokenizers only.

    from dflash_edge.runtime import load
    model = load("exports/smollm2-135m")
    print(model.generate("Write a haiku about the sea.").text)
"""
from .api import DFlashModel, Generation, Result, load
from .generate import GenerationStats
from .sampling import Sampling

__all__ = ["DFlashModel", "Generation", "GenerationStats", "Result", "Sampling", "load"]
