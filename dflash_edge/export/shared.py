"""Move the embedding table and LM head out of the graphs into one file both graphs point at.

Target and drafter both use the target's vocab matrices. As ONNX external data in one shared file they
are stored once on disk, and the runtime maps that file once and hands the same buffer to every session
(SessionOptions.add_initializer), so they are held once in memory too. Any other ONNX tool still opens
each graph on its own: external data is standard.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

SHARED_FILE = "shared_weights.data"
ALIGN = 4096  # page-aligned offsets so the runtime can memory-map each tensor


def _tensor_bytes(tensor: onnx.TensorProto, folder: Path) -> bytes:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        with open(folder / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"]))
    return numpy_helper.to_array(tensor).tobytes()


def share_weights(folder: Path, graphs: list[str], names: list[str]) -> dict:
    """Rewrite `graphs` in `folder` so the initializers `names` live in SHARED_FILE. Returns the index."""
    index: dict[str, dict] = {}
    with open(folder / SHARED_FILE, "wb") as out:
        for graph in graphs:
            model = onnx.load(str(folder / graph), load_external_data=False)
            for tensor in model.graph.initializer:
                if tensor.name not in names:
                    continue
                shape = list(tensor.dims)
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
                if tensor.name not in index:
                    data = _tensor_bytes(tensor, folder)
                    offset = -(-out.tell() // ALIGN) * ALIGN
                    out.write(b"\0" * (offset - out.tell()))
                    out.write(data)
                    index[tensor.name] = {"offset": offset, "length": len(data), "shape": shape,
                                          "dtype": dtype, "graphs": []}
                entry = index[tensor.name]
                entry["graphs"].append(graph)
                if entry["shape"] != shape or entry["dtype"] != dtype:
                    raise ValueError(f"{graph}: {tensor.name} is {shape} {dtype}, "
                                     f"the target has {entry['shape']} {entry['dtype']}")
                del tensor.external_data[:]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", SHARED_FILE), ("offset", entry["offset"]),
                                   ("length", entry["length"])):
                    tensor.external_data.add(key=key, value=str(value))
            onnx.save(model, str(folder / graph))
    missing = set(names) - set(index)
    if missing:
        raise ValueError(f"shared weights not found in the graphs: {sorted(missing)}")
    return {"file": SHARED_FILE, "tensors": index}
