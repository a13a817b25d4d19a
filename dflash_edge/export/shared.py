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


def _external(tensor: onnx.TensorProto) -> dict | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def _copy_tensor(tensor: onnx.TensorProto, folder: Path, out) -> int:
    """Append the tensor's bytes to `out` in pieces (a vocab matrix is gigabytes); returns their length."""
    info = _external(tensor)
    if info is None:
        data = numpy_helper.to_array(tensor).tobytes()
        out.write(data)
        return len(data)
    length = int(info["length"])
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        left = length
        while left:
            piece = f.read(min(left, 64 << 20))
            if not piece:
                raise ValueError(f"{info['location']} ends inside {tensor.name}")
            out.write(piece)
            left -= len(piece)
    return length


def share_weights(folder: Path, graphs: list[str], names: list[str]) -> dict:
    """Rewrite `graphs` in `folder` so the initializers `names` live in SHARED_FILE. Returns the index.
    A streamed export wrote them there already; then the graphs are only indexed."""
    index: dict[str, dict] = {}
    models = {graph: onnx.load(str(folder / graph), load_external_data=False) for graph in graphs}
    written = [(_external(t) or {}).get("location") == SHARED_FILE
               for m in models.values() for t in m.graph.initializer if t.name in names]
    in_place = bool(written) and all(written)
    with open(folder / SHARED_FILE, "rb" if in_place else "wb") as out:
        for graph, model in models.items():
            for tensor in model.graph.initializer:
                if tensor.name not in names:
                    continue
                shape = list(tensor.dims)
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).name
                if tensor.name not in index:
                    if in_place:
                        info = _external(tensor)
                        offset, length = int(info.get("offset", 0)), int(info["length"])
                    else:
                        offset = -(-out.tell() // ALIGN) * ALIGN
                        out.write(b"\0" * (offset - out.tell()))
                        length = _copy_tensor(tensor, folder, out)
                    index[tensor.name] = {"offset": offset, "length": length, "shape": shape,
                                          "dtype": dtype, "graphs": []}
                entry = index[tensor.name]
                entry["graphs"].append(graph)
                if entry["shape"] != shape or entry["dtype"] != dtype:
                    raise ValueError(f"{graph}: {tensor.name} is {shape} {dtype}, "
                                     f"the target has {entry['shape']} {entry['dtype']}")
                if in_place:
                    continue
                del tensor.external_data[:]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", SHARED_FILE), ("offset", entry["offset"]),
                                   ("length", entry["length"])):
                    tensor.external_data.add(key=key, value=str(value))
            if not in_place:
                onnx.save(model, str(folder / graph))
    missing = set(names) - set(index)
    if missing:
        raise ValueError(f"shared weights not found in the graphs: {sorted(missing)}")
    return {"file": SHARED_FILE, "tensors": index}
