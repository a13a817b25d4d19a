"""KV cache buffers that the graphs write in place: one class for the target's cache and the drafter's."""
from __future__ import annotations

import numpy as np

from .providers import ort  # one line, not a traceback, when no ONNX Runtime build is installed


class KVCache:
    """Per layer a key buffer [1, kv, capacity, d] and a value buffer stored transposed, [1, kv, d, capacity];
    slot i holds position i.

    The graphs take the buffers as inputs, write the new positions' K/V at their slots and return the
    buffers as outputs; the runtime binds each output to its input's memory (IOBinding), so a step writes
    its new rows and copies nothing else, and on a GPU the cache never leaves the device. Attention is
    masked by position, so what lies past `length` (rows of rejected drafts) is never read before the next
    step overwrites it: committing raises `length`, rolling back leaves it where it was.

    On the host the buffers are numpy arrays that the OrtValues wrap, grown in CHUNK-slot steps (attention
    reads the whole capacity, so it stays within CHUNK - 1 slots of what is used). On a device, growing
    means a round trip through host memory, so it grows in DEVICE_CHUNK steps: rarely, and without
    reserving a whole request's max_tokens up front, which every step's attention would read (review F8).
    max_slots: never more (TensorRT's profiles end there), unless a single call needs it.

    double: two sets of buffers, the graph reading one and writing the other, swapped after every write.
    TensorRT defines an output that aliases an input only for its KV-cache layer and aliased plugins, not
    for a generic scatter (review F6), so under TensorRT the in-place write is not relied on; the graph then
    copies the cache into the other set each call, as an unaliased ScatterElements does.
    """

    CHUNK = 128
    DEVICE_CHUNK = 1024

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device: str = "cpu",
                 device_id: int = 0, step: int | None = None, max_slots: int | None = None,
                 double: bool = False):
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        self.step = step or self.CHUNK  # slots a growth rounds up to (a multiple of CHUNK)
        self.max_slots = max_slots
        self.double = double
        self.spare: list[ort.OrtValue] = []  # with double: where the next write goes
        self._parity = 0  # with double: which set is `values`, so a kept binding matches its buffers
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.length = 0
        self.capacity = 0
        self.values: list[ort.OrtValue] = []
        self._host: list[np.ndarray] = []  # on the host, the arrays the OrtValues wrap: keep them alive
        self._bindings: dict[tuple, tuple[object, ort.IOBinding]] = {}  # see binding()

    def _shape(self, i: int, slots: int) -> tuple[int, ...]:
        kv, d = self.num_kv_heads, self.head_dim
        return (1, kv, slots, d) if i % 2 == 0 else (1, kv, d, slots)

    @staticmethod
    def _slots(i: int, end: int) -> tuple:
        """Index of slots 0..end in buffer i (keys hold slots on axis 2, values on axis 3)."""
        return (slice(None),) * (2 + i % 2) + (slice(0, end),)

    def reserve(self, n: int) -> None:
        """Make room for n positions after the committed ones."""
        need = self.length + n
        if need <= self.capacity:
            return
        capacity = -(-need // self.step) * self.step
        if self.max_slots:
            capacity = max(min(capacity, self.max_slots), -(-need // self.CHUNK) * self.CHUNK)
        old = [v.numpy() for v in self.values]  # views on the host, copies from a device
        # Zeros, not np.empty: masked slots must hold finite values, or 0 * NaN poisons the attention.
        arrays = [np.zeros(self._shape(i, capacity), dtype=self.dtype) for i in range(2 * self.num_layers)]
        for i, (new, buf) in enumerate(zip(arrays, old)):
            new[self._slots(i, self.length)] = buf[self._slots(i, self.length)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in arrays]
        spare = [np.zeros_like(a) for a in arrays] if self.double else []
        self.spare = [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in spare]
        self._host = arrays + spare if self.device == "cpu" else []
        self._parity = 0
        self.capacity = capacity
        self._bindings.clear()  # they point at the old buffers

    def commit(self, keep: int) -> None:
        """Keep `keep` more positions: the first ones the last call wrote after the committed length."""
        if self.length + keep > self.capacity:
            raise ValueError(f"cannot commit {keep} positions: {self.capacity - self.length} were written")
        self.length += keep

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer i's committed keys [1, kv, length, d] and values [1, kv, length, d] (views on the host,
        copies from a device)."""
        keys, values = (v.numpy() for v in self.values[2 * i : 2 * i + 2])
        return keys[:, :, :self.length], values[..., :self.length].swapaxes(2, 3)

    def bind(self, binding: ort.IOBinding, inputs: list[str], outputs: list[str]) -> None:
        """Feed the buffers to a graph and let it write them in place (with double: into the spare set)."""
        for value, target, name_in, name_out in zip(self.values, self.spare or self.values, inputs, outputs):
            binding.bind_ortvalue_input(name_in, value)
            binding.bind_ortvalue_output(name_out, target)

    def written(self) -> None:
        """After a call that wrote the cache: with double buffers, what it wrote becomes the cache."""
        if self.double:
            self.values, self.spare = self.spare, self.values
            self._parity ^= 1

    def binding(self, session, inputs: list[str], outputs: list[str] | None,
                first: tuple[tuple[str, str], ...] = ()) -> ort.IOBinding:
        """session's IOBinding with the buffers bound (as inputs, and as the outputs the graph writes them to
        unless outputs is None), made on first use and kept until the buffers are reallocated.

        first: the (name, device) outputs the caller rebinds on every call, bound here ahead of the buffers
        so that get_outputs() returns them first, in this order. They must be rebound before every run: ORT
        keeps the last run's output in the binding and would write the next one into it (the taps a caller
        still holds, or a buffer of the wrong shape). Rebinding a name replaces it in place."""
        key = (id(session), outputs is None, first, self._parity)
        kept = self._bindings.get(key)
        if kept is not None and kept[0] is session:
            return kept[1]
        binding = session.io_binding()
        for name, device in first:
            binding.bind_output(name, device)
        if outputs is None:
            for value, name in zip(self.values, inputs):
                binding.bind_ortvalue_input(name, value)
        else:
            self.bind(binding, inputs, outputs)
        self._bindings[key] = (session, binding)
        return binding
