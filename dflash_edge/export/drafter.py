"""The DFlash drafter (z-lab architecture) and its checkpoint format.

A small stack of non-causal Qwen3-style layers. The tapped target features of committed tokens are fused
(`fc` then `hidden_norm`) and projected by every layer's own k/v projections into a context cache: the
"KV injection". A block `[last committed token, mask x (B-1)]` attends over [context ; block] with no
mask at all, and the target's LM head turns rows 1..B-1 into the drafts. Reference: z-lab/dflash
`dflash/model.py`; tensor names match its safetensors so checkpoints move both ways unchanged.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .modeling import (DecoderLayer, DecoderSpec, RMSNorm, Rotary, attend, attend_cached, cache_shapes, lm_head,
                       write_slots)


def default_tap_layer_ids(num_target_layers: int, num_taps: int = 5) -> list[int]:
    """z-lab's rule: `num_taps` ids evenly spaced from 1 to L-3, rounded; the middle layer for one tap."""
    if num_taps == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    return [round(start + i * (end - start) / (num_taps - 1)) for i in range(num_taps)]


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "drafter config") -> "DrafterConfig":
        if not isinstance(cfg, dict):
            raise UserError(f"{source} is not a JSON object; it is not a DFlash drafter config")
        dcfg = cfg.get("dflash_config") or {}
        if not isinstance(dcfg, dict):
            raise UserError(f"{source}: dflash_config must be an object, got {_shown(dcfg)}")
        for name in ("architectures", "layer_types"):
            if cfg.get(name) is not None and not (isinstance(cfg[name], list) and
                                                  all(isinstance(x, str) for x in cfg[name])):
                raise UserError(f"{source}: {name} must be a list of names, got {_shown(cfg[name])}")
        refuse_unsupported(cfg, source)

        def pick(name, default=None):
            # z-lab heads put these under dflash_config, others at the top level: accept both.
            return dcfg.get(name, cfg.get(name, default))

        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in cfg]
        if pick("mask_token_id") is None:
            missing.append("mask_token_id")
        if missing:
            raise UserError(f"{source} lacks {', '.join(missing)}; it is not a DFlash drafter config")
        # Every size is checked before anything is computed or allocated from it: a string would raise a
        # TypeError deep in torch, a zero a ZeroDivisionError, a huge size would try to allocate it.
        sizes = {name: _whole(source, name, cfg[name]) for name in SIZE_LIMITS if name != "block_size" and
                 name in cfg and not (name in _DERIVED_IF_NULL and cfg[name] is None)}
        heads = sizes["num_attention_heads"]
        kv_heads = sizes.get("num_key_value_heads", heads)
        if heads % kv_heads:
            raise UserError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                            f"{kv_heads}")
        if "head_dim" not in sizes and sizes["hidden_size"] % heads:
            raise UserError(f"{source}: hidden_size {sizes['hidden_size']} is not a multiple of "
                            f"num_attention_heads {heads}, and there is no head_dim")
        head_dim = sizes.get("head_dim", sizes["hidden_size"] // heads)
        if head_dim % 2:
            raise UserError(f"{source}: head_dim {head_dim} is odd; rotary embeddings need an even one")
        num_layers = sizes["num_hidden_layers"]
        num_target_layers = sizes.get("num_target_layers")
        block_size = _whole(source, "block_size", pick("block_size", 16), 2, SIZE_LIMITS["block_size"])
        mask_token_id = _whole(source, "mask_token_id", pick("mask_token_id"), 0, sizes["vocab_size"] - 1)
        tap_ids = pick("target_layer_ids")
        if tap_ids is None:
            if num_target_layers is None:
                raise UserError(f"{source} has neither target_layer_ids nor num_target_layers")
            tap_ids = default_tap_layer_ids(num_target_layers, num_layers)
        if not isinstance(tap_ids, list) or not tap_ids or len(tap_ids) > SIZE_LIMITS["num_target_layers"]:
            raise UserError(f"{source}: target_layer_ids must be a non-empty list of layer ids, got "
                            f"{_shown(tap_ids)}")
        top = (num_target_layers or SIZE_LIMITS["num_target_layers"]) - 1
        tap_ids = [_whole(source, "target_layer_ids", i, 0, top) for i in tap_ids]
        params = _parameter_count(sizes["hidden_size"], sizes["intermediate_size"], num_layers, heads, kv_heads,
                                  head_dim, len(tap_ids))
        if params > MAX_DRAFTER_PARAMS:
            raise UserError(f"{source} describes a drafter of {params / 1e9:.0f}B parameters, more than the "
                            f"{MAX_DRAFTER_PARAMS / 1e9:.0f}B any DFlash drafter has; the config is damaged")
        rope_theta, rope_scaling = _checked_rope(source, cfg)
        return cls(
            hidden_size=sizes["hidden_size"],
            intermediate_size=sizes["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=sizes["vocab_size"],
            block_size=block_size,
            mask_token_id=mask_token_id,
            target_layer_ids=tap_ids,
            num_target_layers=num_target_layers if num_target_layers is not None else max(tap_ids) + 4,
            rms_norm_eps=_number(source, "rms_norm_eps", cfg.get("rms_norm_eps", 1e-6), positive=True),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=sizes.get("max_position_embeddings", 40960),
            attention_bias=_flag(source, "attention_bias", cfg.get("attention_bias", False)),
            input_embedding_scale=_number(source, "input_embedding_scale", pick("input_embedding_scale", 1.0)),
            output_multiplier=_number(source, "output_multiplier", pick("output_multiplier", 1.0)),
            final_logit_softcapping=(None if pick("final_logit_softcapping") is None else
                                     _number(source, "final_logit_softcapping", pick("final_logit_softcapping"),
                                             positive=True)),
            raw=dict(cfg),
        )

    def spec(self) -> DecoderSpec:
        return DecoderSpec(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_layers=self.num_hidden_layers, num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            qk_norm=True, attention_bias=self.attention_bias,
        )

    def to_dict(self) -> dict:
        """A z-lab config.json: loads in the reference package, vLLM and SGLang."""
        cfg = dict(self.raw)
        cfg.update({
            "architectures": ["DFlashDraftModel"],
            "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "sliding_window": None,
            "use_sliding_window": False,
            "tie_word_embeddings": False,
            "num_target_layers": self.num_target_layers,
            "block_size": self.block_size,
            "dflash_config": {**(self.raw.get("dflash_config") or {}),
                              "mask_token_id": self.mask_token_id,
                              "target_layer_ids": self.target_layer_ids},
        })
        return cfg


# Upper bounds for a drafter config's whole numbers, far above any released model's (hidden sizes go to
# about 16,000, vocabularies to about 260,000, drafters have a handful of layers): they only stop a damaged
# or hostile config from asking for terabytes before the parameter count below is even computed.
SIZE_LIMITS = {
    "hidden_size": 2**16, "intermediate_size": 2**19, "num_hidden_layers": 512, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "head_dim": 1024, "vocab_size": 2**22, "num_target_layers": 1024,
    "max_position_embeddings": 2**24, "block_size": 1024,
}
# Fields read from the config's top level that may also be null, meaning "derive it".
_DERIVED_IF_NULL = ("num_key_value_heads", "head_dim", "num_target_layers", "max_position_embeddings")
# A drafter is a few layers beside its target, a small fraction of its size: this is far past any.
MAX_DRAFTER_PARAMS = 20e9


def _shown(value) -> str:
    """A value for a one-line message, short whatever it is (a 5,000-digit int has no str() at all)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(source: str, name: str, value, low: int = 1, high: int | None = None) -> int:
    # bool is an int subclass: true would pass as 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{source}: {name} must be a whole number, got {_shown(value)}")
    high = SIZE_LIMITS[name] if high is None else high
    if not low <= value <= high:
        raise UserError(f"{source}: {name} {_shown(value)} is outside {low}..{high}")
    return value


def _number(source: str, name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise UserError(f"{source}: {name} must be a finite{' positive' * positive} number, got {_shown(value)}")
    return float(value)


def _flag(source: str, name: str, value) -> bool:
    if not isinstance(value, bool):  # bool("false") is True
        raise UserError(f"{source}: {name} must be true or false, got {_shown(value)}")
    return value


def _parameter_count(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                     taps: int) -> int:
    """The drafter's own parameters (the fc, its layers and norms), by arithmetic: nothing is allocated."""
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads) + 2 * head_dim
    layer = attention + 3 * hidden * intermediate + 2 * hidden
    return taps * hidden * hidden + layers * layer + 2 * hidden


def _checked_rope(source: str, cfg: dict) -> tuple[float, dict | None]:
    for name in ("rope_parameters", "rope_scaling"):
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise UserError(f"{source}: {name} must be an object or null, got {_shown(cfg[name])}")
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        _number(source, "rope_theta", theta, positive=True)
    return rope_settings(cfg)


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from a transformers 4 config (rope_theta, rope_scaling) or a transformers 5 one
    (rope_parameters, which holds both)."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 1e6)
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return theta, scaling or None


def refuse_unsupported(cfg: dict, source: str) -> None:
    """Refuse checkpoints this version would run wrongly, naming the feature."""
    dcfg = cfg.get("dflash_config") or {}
    archs = cfg.get("architectures") or []
    problems = []
    if any("DFlash2" in a for a in archs) or any(k in dcfg or k in cfg for k in ("conv_kernel_size", "selector_rank")):
        problems.append("DFlash2 (dynamic convolution and candidate selector)")
    projector = dcfg.get("projector_type", cfg.get("projector_type", "dflash"))
    if projector != "dflash":
        problems.append(f"projector_type {projector!r} (only 'dflash' is supported)")
    if "sliding_attention" in (cfg.get("layer_types") or []) or cfg.get("use_sliding_window") or dcfg.get("use_swa"):
        problems.append("sliding-window attention layers")
    if cfg.get("is_causal") or dcfg.get("causal"):
        problems.append("causal draft attention")
    if problems:
        raise UserError(f"{source}: unsupported drafter: {'; '.join(problems)}. "
                        "dflash-edge runs full-attention, non-causal DFlash drafters")


def rotary_for(config: DrafterConfig) -> Rotary:
    d = config.head_dim
    if not config.rope_scaling:
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        return Rotary(inv_freq)
    # Scaled rope variants: let transformers compute the frequencies it would use.
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    hf = Qwen3RotaryEmbedding(Qwen3Config(**{k: v for k, v in config.to_dict().items() if k != "auto_map"}))
    return Rotary(hf.inv_freq, getattr(hf, "attention_scaling", 1.0))


class DFlashDrafter(nn.Module):
    """The trainable drafter. The target's embedding and LM head are attached, frozen and never saved."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        spec = config.spec()
        n_taps = len(config.target_layer_ids)
        self.fc = nn.Linear(n_taps * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary_for(config)
        self.embed_weight: torch.Tensor | None = None
        self.head_weight: torch.Tensor | None = None

    def attach_target(self, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> None:
        self.embed_weight = embed_weight.detach()
        self.head_weight = head_weight.detach()

    def context_kv(self, target_hidden: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        """Project tapped features into every layer's context K/V.

        target_hidden: [b, n, n_taps*H] (fp32), position_ids: [b, n] -> [k_0, v_0, k_1, ...] each [b, kv, n, d].
        The fc runs in fp32 whatever the weights' dtype: taps reach |x| ~ 25,000 and fp16 overflows there.
        """
        fused = F.linear(target_hidden.float(), self.fc.weight.float())
        dtype = self.layers[0].self_attn.k_proj.weight.dtype
        fused = self.hidden_norm(fused).to(dtype)
        cos, sin = self.rotary(position_ids, dtype)
        out = []
        for layer in self.layers:
            out += layer.self_attn.project_kv(fused, cos, sin)
        return out

    def block_hidden(self, block_embeds: torch.Tensor, position_ids: torch.Tensor,
                     context: list[torch.Tensor], bias: torch.Tensor | None = None,
                     fused: bool = False) -> torch.Tensor:
        """Run the block over [context ; block]; non-causal, so no mask unless training packs blocks.
        fused: torch's fused attention kernel (training and evaluation in torch; never exported)."""
        x = block_embeds
        cos, sin = self.rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            q = attn.project_q(h, cos, sin)
            k, v = attn.project_kv(h, cos, sin)
            k = torch.cat([context[2 * i], k], dim=2)
            v = torch.cat([context[2 * i + 1], v], dim=2)
            if fused:
                mask = None if bias is None else bias.to(q.dtype)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            else:
                out = attend(q, k, v, bias)
            x = x + attn.output(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def cache_shapes(self, slots: int) -> list[tuple[int, ...]]:
        """Shapes of the draft cache buffers the exported graphs read and write (see modeling.cache_shapes)."""
        c = self.config
        return cache_shapes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, slots)

    def context_into(self, target_hidden: torch.Tensor, position_ids: torch.Tensor,
                     cache: list[torch.Tensor]) -> list[torch.Tensor]:
        """context_kv written into a draft cache buffer (per layer keys [1, kv, slots, d], values stored
        transposed [1, kv, d, slots]) at slots position_ids, as the exported context graph does in place."""
        new = self.context_kv(target_hidden, position_ids)
        positions = position_ids[0]
        out = []
        for i in range(0, len(new), 2):
            out.append(write_slots(cache[i], new[i], positions, 2))
            out.append(write_slots(cache[i + 1], new[i + 1].transpose(-1, -2), positions, 3))
        return out

    def block_hidden_in_buffer(self, block_embeds: torch.Tensor, position_ids: torch.Tensor,
                               cache: list[torch.Tensor]) -> torch.Tensor:
        """block_hidden over a draft cache buffer: context slots before the block's first position are
        visible, later ones (stale rows of rejected drafts) are not; the block sees itself in full."""
        x = block_embeds
        block = x.shape[1]
        cos, sin = self.rotary(position_ids, x.dtype)
        slots = torch.arange(cache[0].shape[2], device=x.device)
        context = torch.where(slots < position_ids[0, :1], 0.0, torch.finfo(torch.float32).min)
        bias = torch.cat([context.expand(block, -1), torch.zeros(block, block, device=x.device)], dim=-1)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            q = attn.project_q(h, cos, sin)
            k, v = attn.project_kv(h, cos, sin)
            x = x + attn.output(attend_cached(q, cache[2 * i], cache[2 * i + 1], k, v, bias[None, None]))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed_weight)
        if self.config.input_embedding_scale != 1.0:
            x = x * self.config.input_embedding_scale
        return x.to(self.fc.weight.dtype)

    def logits(self, hidden: torch.Tensor, head_weight: torch.Tensor | None = None) -> torch.Tensor:
        head_weight = self.head_weight if head_weight is None else head_weight
        logits = lm_head(hidden.to(head_weight.dtype), head_weight)
        if self.config.output_multiplier != 1.0:
            logits = logits * self.config.output_multiplier
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, target_hidden, context_positions, block_ids, block_positions) -> torch.Tensor:
        """Logits for a block given fresh context: [b, B, vocab]. Used for parity checks and training."""
        context = self.context_kv(target_hidden, context_positions)
        return self.logits(self.block_hidden(self.embed(block_ids), block_positions, context))


def read_drafter_config(path: str | Path) -> DrafterConfig:
    """The config of a z-lab checkpoint folder (config.json + *.safetensors), its weights unread."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.json; a DFlash drafter folder holds config.json and *.safetensors")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file} is not valid JSON ({e})") from None
    config = DrafterConfig.from_dict(raw, str(cfg_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights")
    check_tensor_names_unique(files)
    return config


def check_tensor_names_unique(files: list[Path]) -> None:
    """Refuse shards that hold the same tensor: loaded one after another, the later would silently win,
    so which weights run would depend on file names. Only the headers are read."""
    from safetensors import safe_open

    first: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                names = list(handle.keys())
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            raise UserError(f"cannot read {f}: {e}") from None
        for name in names:
            # z-lab's optional "model." prefix is dropped on loading, so both spellings are one tensor.
            key = name.removeprefix("model.")
            if key in first:
                raise UserError(f"{f.parent}: tensor {key} is in both {first[key].name} and {f.name}; a "
                                "drafter's *.safetensors files must not overlap")
            first[key] = f


def drafter_parameter_shapes(config: DrafterConfig) -> dict[str, tuple[int, ...]]:
    """{checkpoint name: shape} of the drafter's own weights, from its config alone."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in DFlashDrafter(config).state_dict().items()}


def check_drafter_weights(path: Path | str, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose tensors are not the config's (names without z-lab's optional model.)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the DFlash layout "
                        f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, shape in found.items():
        if tuple(shape) != expected[k]:
            raise UserError(f"{path}: {k} has shape {tuple(shape)}, config says {expected[k]}")


SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")


def load_drafter(path: str | Path) -> DFlashDrafter:
    """Load a z-lab checkpoint folder (config.json + *.safetensors) whole, in fp32."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_drafter_config(path)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise UserError(f"cannot read {f}: {e}") from None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    for shared in SHARED_WITH_TARGET:
        state.pop(shared, None)
    check_drafter_weights(path, drafter_parameter_shapes(config), {k: tuple(v.shape) for k, v in state.items()})
    model = DFlashDrafter(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


DRAFT_VOCAB_FILE = "draft_vocab.json"


def read_draft_vocab(path: str | Path, vocab_size: int) -> list[int] | None:
    """The drafter's ranked draft vocabulary (draft_vocab.json beside its config), or None without one.

    It lists target token ids, most frequent label first, so any prefix is the top-N. The checkpoint
    itself stays z-lab's (the head is the target's); the list only lets the exported graph score N rows
    of the LM head instead of all of them, the way vLLM's draft_vocab_size + d2t does.
    """
    f = Path(path) / DRAFT_VOCAB_FILE
    if not f.is_file():
        return None
    try:
        ids = json.loads(f.read_text())["token_ids"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{f} is unreadable ({e}); a draft vocabulary is {{\"token_ids\": [ids...]}}") from None
    if (not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids)
            or len(set(ids)) != len(ids)):
        raise UserError(f"{f}: token_ids must be distinct token ids in 0..{vocab_size - 1}")
    return ids


def write_draft_vocab(path: str | Path, ranked_ids: list[int], coverage: float) -> None:
    (Path(path) / DRAFT_VOCAB_FILE).write_text(json.dumps(
        {"token_ids": [int(i) for i in ranked_ids], "label_coverage": round(float(coverage), 5)}) + "\n")


def save_drafter(model: DFlashDrafter, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write config.json + model.safetensors in z-lab's format (no embedding, no LM head)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def config_for_target(target_config, num_layers: int = 1, block_size: int = 16, mask_token_id: int = 0,
                      tap_layer_ids: list[int] | None = None) -> DrafterConfig:
    """A drafter config shaped like z-lab's for a given HF target config (heads copied from the target)."""
    heads = target_config.num_attention_heads
    taps = tap_layer_ids or default_tap_layer_ids(target_config.num_hidden_layers)
    raw = {
        "hidden_size": target_config.hidden_size,
        "intermediate_size": target_config.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(target_config, "num_key_value_heads", heads),
        "head_dim": getattr(target_config, "head_dim", None) or target_config.hidden_size // heads,
        "vocab_size": target_config.vocab_size,
        "rms_norm_eps": float(target_config.rms_norm_eps),
        "rope_theta": rope_settings(target_config.to_dict())[0],
        "max_position_embeddings": target_config.max_position_embeddings,
        "num_target_layers": target_config.num_hidden_layers,
        "block_size": block_size,
        "dflash_config": {"mask_token_id": mask_token_id, "target_layer_ids": taps},
    }
    return DrafterConfig.from_dict(raw)


def random_drafter(config: DrafterConfig, seed: int = 0, std: float = 0.02) -> DFlashDrafter:
    """A freshly initialised drafter (normal(0, std) weights, unit norms), as training starts from."""
    g = torch.Generator().manual_seed(seed)
    model = DFlashDrafter(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()
