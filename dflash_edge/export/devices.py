"""Device presets for dflash-export (--device) and the Jetson Orin memory and speed budget.

A preset only picks defaults: the graph variant and the precision a device runs best. The budget is
arithmetic from the published shapes of the models and the modules' memory sizes and DRAM bandwidths;
`python -m dflash_edge.export.devices` prints it as the table in samples/jetson/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class DevicePreset:
    variant: str
    dtype: str
    int4_above: float  # targets with more parameters than this get int4 weights
    why: str


PRESETS = {
    "jetson-orin": DevicePreset(
        variant="tensorrt", dtype="fp16", int4_above=2e9,
        why="TensorRT takes the standard-op graphs whole; Orin runs FP16, INT8 and INT4 only, and a target "
            "over 2B parameters needs int4 weights to leave room for its drafter"),
    # Desktop NVIDIA cards on ONNX Runtime's CUDA or TensorRT provider. Not the ort variant's int4/int8:
    # its MatMulNBits takes fp32 activations, and CUDA's kernel for them is a GEMV for one row only, so a
    # verify or a prefill dequantizes every weight per call (gpu-review F7). fp16 graphs run on tensor cores;
    # int4 as DequantizeLinear + MatMul over fp16, which TensorRT takes whole. 8B in fp16 is 16 GB of weights,
    # more than most 8-16 GB desktop cards hold next to caches and a drafter: int4 above 4B parameters.
    "nvidia-gpu": DevicePreset(
        variant="tensorrt", dtype="fp16", int4_above=4e9,
        why="fp16 runs on tensor cores; the standard-op int4 graph avoids MatMulNBits' fp32 path on CUDA, and "
            "a target over 4B parameters needs int4 weights to fit a desktop card with its drafter"),
}


def apply_preset(device: str | None, dtype: str | None, variant: str | None, quantize: str | None,
                 target_params: int) -> tuple[str, str, str | None, str | None]:
    """(dtype, variant, quantize, note): explicit options win; the preset fills the rest."""
    if device is None:
        return dtype or "fp32", variant or "ort", quantize, None
    if device not in PRESETS:
        raise UserError(f"unknown --device {device!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[device]
    if variant not in (None, preset.variant):
        raise UserError(f"--device {device} builds the {preset.variant} variant; drop --variant {variant}")
    if quantize is None and target_params > preset.int4_above:
        quantize = "int4"
    dtype = dtype or preset.dtype
    note = (f"--device {device}: {preset.variant} graphs, {dtype}"
            f"{', int4 weights' if quantize == 'int4' else ''} ({preset.why})")
    return dtype, preset.variant, quantize, note


# ---- the Jetson Orin budget -------------------------------------------------------------------------

@dataclass(frozen=True)
class Module:
    name: str
    memory_gb: float
    bandwidth_gbs: float  # DRAM bandwidth, default power mode (JetPack 6.2 "super" modes raise Nano/NX)


ORIN = [
    Module("Orin Nano 8GB", 8, 68),
    Module("Orin NX 16GB", 16, 102.4),
    Module("AGX Orin 32GB", 32, 204.8),
    Module("AGX Orin 64GB", 64, 204.8),
]
RESERVED_GB = 2.5  # L4T and a desktop (~1.5 GB) plus the CUDA/TensorRT runtime (~1 GB): unified memory
CONTEXT = 4096     # tokens of KV cache budgeted


@dataclass(frozen=True)
class Shape:
    """What the budget needs of a decoder: from each model's config.json."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config) -> "Shape":
        """From a Hugging Face config (dflash-export's memory estimate, export/budget.py)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def layer_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate

    def vocab_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.vocab_params()

    def largest_tensor(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.intermediate, self.hidden * self.heads * self.head_dim)

    def kv_bytes_per_token(self, layers: int, bytes_per_value: int = 2) -> int:
        return 2 * layers * self.kv_heads * self.head_dim * bytes_per_value


SHAPES = {
    "Llama-3.1-8B": Shape(128256, 4096, 14336, 32, 32, 8, 128, tied=False),
    "Qwen3-4B": Shape(151936, 2560, 9728, 36, 32, 8, 128, tied=True),
    "SmolLM2-135M": Shape(49152, 576, 1536, 30, 9, 3, 64, tied=True),
}
INT4_BYTES = 0.5 + 2 / 32  # 4-bit weights plus one fp16 scale per block of 32


@dataclass(frozen=True)
class Setup:
    label: str
    model: str
    int4: bool          # projection weights in int4 (the embedding and LM head stay fp16: the drafter shares them)
    drafter_layers: int  # z-lab's Qwen3 drafters have 5; the SmolLM2 drafter shipped here has 1
    taps: int = 5

    def target_gb(self) -> float:
        s = SHAPES[self.model]
        matrices = s.vocab * s.hidden * (1 if s.tied else 2)
        per_weight = INT4_BYTES if self.int4 else 2
        return (matrices * 2 + s.layers * s.layer_params() * per_weight) / 1e9

    def streamed_gb(self) -> float:
        """What one target forward reads: everything but an untied embedding table (one row per token)."""
        s = SHAPES[self.model]
        return self.target_gb() - (0 if s.tied else s.vocab * s.hidden * 2 / 1e9)

    def drafter_gb(self) -> float:
        s = SHAPES[self.model]
        return (self.drafter_layers * s.layer_params() + self.taps * s.hidden * s.hidden) * 2 / 1e9

    def vocab_copy_gb(self) -> float:
        """The drafter's own device copy of the embedding and LM head (fp16): shared with the target only on
        the CPU; on CUDA each session uploads its initializers, and TensorRT builds them into each engine."""
        s = SHAPES[self.model]
        return s.vocab * s.hidden * (1 if s.tied else 2) * 2 / 1e9

    def kv_gb(self) -> float:
        """Both caches, twice: under TensorRT they are double-buffered (runtime/cache.py, review F6)."""
        s = SHAPES[self.model]
        return 2 * CONTEXT * (s.kv_bytes_per_token(s.layers) + s.kv_bytes_per_token(self.drafter_layers)) / 1e9


SETUPS = [
    Setup("Llama-3.1-8B int4 + drafter", "Llama-3.1-8B", int4=True, drafter_layers=5),
    Setup("Qwen3-4B int4 + drafter", "Qwen3-4B", int4=True, drafter_layers=5),
    Setup("Qwen3-4B fp16 + drafter", "Qwen3-4B", int4=False, drafter_layers=5),
    Setup("SmolLM2-135M fp16 + drafter", "SmolLM2-135M", int4=False, drafter_layers=1),
]


def ceilings(setup: Setup, module: Module, tau: float) -> tuple[float, float]:
    """Bandwidth-bound tokens/s: plain decoding reads the target and the KV cache once per token; a DFlash
    round reads them (one verify) and the drafter (one draft) once and yields tau tokens. Compute is
    assumed to keep up, which holds for a 16-token verify while weights dominate the bytes moved."""
    # Attention reads the whole cache buffer, masked, every step; on a GPU it grows in 1,024-slot steps, so
    # a generation that fills the budget's context reads about the full cache per token.
    kv_read = setup.kv_gb() / 2  # a step reads one of the two sets (and the graph writes the other)
    plain = module.bandwidth_gbs / (setup.streamed_gb() + kv_read)
    dflash = tau * module.bandwidth_gbs / (setup.streamed_gb() + setup.drafter_gb() + kv_read)
    return plain, dflash


def budget_table(tau: float = 6.5) -> str:
    head = (f"| setup | weights: target + drafter + its vocab copy (GB) | KV @ {CONTEXT} (GB) | "
            + " | ".join(m.name for m in ORIN) + " |")
    lines = [head, "|" + "---|" * (3 + len(ORIN))]
    for setup in SETUPS:
        weights = setup.target_gb() + setup.drafter_gb() + setup.vocab_copy_gb()
        total = weights + setup.kv_gb()
        cells = []
        for module in ORIN:
            plain, dflash = ceilings(setup, module, tau)
            if total > module.memory_gb - RESERVED_GB:
                cells.append(f"does not fit ({total + RESERVED_GB:.1f} GB)")
            else:
                cells.append(f"fits; ≤ {plain:.0f} → ≤ {dflash:.0f} tok/s")
        lines.append(f"| {setup.label} | {setup.target_gb():.2f} + {setup.drafter_gb():.2f} + "
                     f"{setup.vocab_copy_gb():.2f} | {setup.kv_gb():.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(budget_table())
