"""The torch-free runtime: numpy, onnxruntime and tokenizers only.

    from dflash_edge.runtime import load
    model = load("exports/smollm2-135m")
    print(model.generate("Write a haiku about the sea.").text)
"""
import importlib

# Imported on first use (PEP 562), so that the command-line tools start without onnxruntime and report a
# missing or broken ONNX Runtime install in one line (providers.MissingRuntime) instead of a traceback.
_EXPORTS = {"DFlashModel": ".api", "Generation": ".api", "Result": ".api", "load": ".api",
            "GenerationStats": ".generate", "Sampling": ".sampling"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
