"""dflash-edge: lossless DFlash speculative decoding on ONNX Runtime."""

__version__ = "0.1.0"
