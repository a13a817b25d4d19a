"""Check exported graphs against PyTorch on random inputs and report the worst error per output.

Errors are relative to the largest magnitude of the reference output: the taps reach |x| ~ 25,000 in
real models, where an absolute tolerance says nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..runtime.cache import KVCache
from ..runtime.session import SharedWeights, make_session
from .modeling import BufferedTarget


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(got.astype(np.float64) - ref).max()) / scale


class Report:
    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.rows: list[tuple[str, str, float, bool, str]] = []

    def error(self, graph: str, name: str, err: float, tolerance: float | None = None) -> None:
        tolerance = tolerance or self.tolerance
        bound = f"tolerance {tolerance:.0e}" if tolerance < float("inf") else "reported only; must be finite"
        line = f"worst relative error {err:.2e} ({bound})"
        self.rows.append((graph, name, err, err <= tolerance, line))

    def exact(self, graph: str, name: str, equal_fraction: float, needed: float = 1.0) -> None:
        line = f"{equal_fraction:.0%} identical (needs {needed:.0%})"
        self.rows.append((graph, name, 1.0 - equal_fraction, equal_fraction >= needed, line))

    def check(self, graph: str, name: str, ok: bool, line: str) -> None:
        self.rows.append((graph, name, 0.0 if ok else 1.0, ok, line))

    @property
    def ok(self) -> bool:
        return all(r[3] for r in self.rows)

    def lines(self) -> list[str]:
        return [f"  {'✓' if ok else '✗'} {graph}: {name:<24} {line}" for graph, name, _, ok, line in self.rows]

    def as_dict(self) -> dict:
        return {f"{g}:{n}": {"error": e, "ok": ok} for g, n, e, ok, _ in self.rows}


def _summarise(report: Report, graph: str, names: list[str], got: list, ref: list,
               tolerance: float | None = None) -> None:
    present_worst = 0.0
    for name, g, r in zip(names, got, ref):
        err = rel_error(np.asarray(g), r.detach().float().numpy())
        if name.startswith("present"):
            present_worst = max(present_worst, err)
        else:
            report.error(graph, name, err, tolerance)
    if any(n.startswith("present") for n in names):
        kind = "present_context.*" if graph.startswith("drafter") else "present.*"
        report.error(graph, kind, present_worst, tolerance)


def prefix_cache(target, prefix: torch.Tensor, slots: int, noise: torch.Generator | None = None):
    """The module's own K/V for `prefix` [1, n], and cache buffers of `slots` slots that hold them first;
    the other slots hold noise drawn from `noise` (as stale rows of rejected drafts would) or zeros."""
    n = prefix.shape[1]
    _, _, *kv = target(prefix, torch.arange(n)[None], torch.ones_like(prefix), torch.arange(1),
                       *target.empty_cache(1))
    buffers = []
    for i, (rows, shape) in enumerate(zip(kv, target.cache_shapes(1, slots))):
        buffer = (torch.randn(shape, generator=noise).to(rows.dtype) if noise is not None
                  else torch.zeros(shape, dtype=rows.dtype))
        buffer.narrow(2 + i % 2, 0, n).copy_(rows)
        buffers.append(buffer)
    return kv, buffers


# The rows-against-single-steps check runs past 256 tokens of context (see check_rows_independent).
ROW_CHECK_CONTEXT = 300


@torch.no_grad()
def validate_target(folder: Path, manifest: dict, target, report: Report, seed: int = 0, label: str = "target",
                    tolerance: float | None = None, verify_rows: int = 16, prepack: bool = True) -> None:
    """The ONNX graph against our module on random ids after a cache of random ids.

    The cache holds the module's own keys and values for its prefix: random-noise caches make attention
    ill-conditioned enough that fp32 alone drifts by 1e-4 from fp64 on some draws. The slots after the new
    positions hold noise, as stale rows of rejected drafts would; logits and taps are checked against the
    module run on the prefix alone, so reading those slots would show.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = target.embed_tokens.num_embeddings
    seq, past, stale = 6, 5, 5  # 16 slots: the graph takes an even number of slots (see attend_buffer)
    prefix, ids = torch.randint(0, vocab, (1, past + seq), generator=g).split([past, seq], dim=1)
    prefix_kv, cache = prefix_cache(target, prefix, past + seq + stale, noise=g)
    args = (ids, torch.arange(past, past + seq)[None], torch.arange(seq), *cache)
    # Logits and taps from the module that sees the prefix alone (the stale slots must change nothing),
    # the written caches from the buffered module.
    alone = target(ids, torch.arange(past, past + seq)[None], torch.ones(1, past + seq, dtype=torch.int64),
                   torch.arange(seq), *prefix_kv)
    ref = [*alone[:2], *BufferedTarget(target)(*args)[3:]]
    shared = SharedWeights(folder, manifest.get("shared_weights"))
    session = make_session(folder / manifest["target"]["graph"], ["CPUExecutionProvider"], shared, prepack=prepack)
    names = manifest["target"]["inputs"]
    got = dict(zip(manifest["target"]["outputs"], session.run(None, {n: a.numpy() for n, a in zip(names, args)})))
    # The ids the loop decides by must be the argmax of the logits the same graph returns, row by row.
    chosen = float((got.pop("next_token_ids") == got["logits"].argmax(-1)).mean())
    _summarise(report, label, list(got), list(got.values()), ref, tolerance)
    report.exact(label, "next_token_ids", chosen)
    # A verify block of the size the runtime will use against single steps, past 256 cache slots, where
    # ONNX Runtime's summation order can start to depend on the shape (see check_rows_independent). The
    # cache holds the module's own K/V for a random prefix: noise caches blow rounding up past fp32's.
    context, block = torch.randint(0, vocab, (1, ROW_CHECK_CONTEXT + verify_rows), generator=g).split(
        [ROW_CHECK_CONTEXT, verify_rows], dim=1)
    slots = -(-(ROW_CHECK_CONTEXT + verify_rows) // KVCache.CHUNK) * KVCache.CHUNK  # as the runtime allocates
    _, long_cache = prefix_cache(target, context, slots)
    check_rows_independent(session, names, block.numpy(), [c.numpy() for c in long_cache], ROW_CHECK_CONTEXT,
                           report, label)


def check_rows_independent(session, names: list[str], ids: np.ndarray, cache: list[np.ndarray], start: int,
                           report: Report, label: str) -> None:
    """One call over ids (at positions start...) against the same ids one at a time, through one graph.

    DFlash is exact only if a token's logits do not depend on the other tokens verified with it. ONNX
    Runtime's CPU MatMul sums a long reduction in an order that depends on the number of columns, so past
    256 tokens of context a verify's rows differ from single steps by ~1e-6 relative in fp32: harmless,
    and within tolerance. A graph that rounds activations (int8) amplifies that into different tokens, so
    its attention is traced in the form whose rows are bit-identical on that provider (trace.EXACT_COLUMNS),
    and a graph that still strays fails here. Held to the export dtype's tolerance whatever the
    quantization: the same graph on the same inputs has no rounding excuse.
    """
    n = ids.shape[1]
    outputs = [o.name for o in session.get_outputs()]
    positions = np.arange(start, start + n, dtype=np.int64)[None]
    together = dict(zip(outputs, session.run(None, dict(zip(names, [ids, positions, np.arange(n), *cache])))))
    rows = []
    for i in range(n):
        feeds = dict(zip(names, [ids[:, i:i + 1], positions[:, i:i + 1], np.zeros(1, np.int64), *cache]))
        got = dict(zip(outputs, session.run(None, feeds)))
        rows.append(got["logits"][:, 0])
        cache = [got[name] for name in outputs if name.startswith("present.")]
    report.error(label, "rows = one at a time", rel_error(np.stack(rows, axis=1), together["logits"]))


STANDARD_DOMAINS = ("", "ai.onnx")


def check_standard_ops(folder: Path, graphs: list[str], report: Report) -> None:
    """For TensorRT: every graph passes the ONNX checker and uses standard ONNX ops only."""
    import onnx

    for graph in graphs:
        path = folder / graph
        try:
            onnx.checker.check_model(str(path))
            report.check(graph.removesuffix(".onnx"), "onnx checker", True, "passes")
        except onnx.checker.ValidationError as e:
            report.check(graph.removesuffix(".onnx"), "onnx checker", False, str(e).splitlines()[0])
        model = onnx.load(str(path), load_external_data=False)
        custom = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
        report.check(graph.removesuffix(".onnx"), "standard ops only", not custom,
                     "no custom-domain ops" if not custom else "custom ops: " + ", ".join(custom))


@torch.no_grad()
def check_module(target, hf_model, report: Report, seed: int = 0) -> None:
    """Our fp32 module against transformers itself on a fresh sequence: logits and every tap."""
    g = torch.Generator().manual_seed(seed)
    seq = 7
    ids = torch.randint(0, target.embed_tokens.num_embeddings, (1, seq), generator=g)
    hf_out = hf_model(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    mine = target(ids, torch.arange(seq)[None], torch.ones(1, seq, dtype=torch.int64), torch.arange(seq),
                  *target.empty_cache(1))
    report.error("pytorch", "logits vs transformers", rel_error(mine[0].numpy(), hf_out.logits.float().numpy()))
    taps = torch.cat([hf_out.hidden_states[i + 1] for i in target.tap_layer_ids], dim=-1)
    report.error("pytorch", "taps vs hidden_states", rel_error(mine[1].numpy(), taps.float().numpy()))


@torch.no_grad()
def validate_drafter(folder: Path, manifest: dict, drafter, embed, head, report: Report, seed: int = 0,
                     vocab_ids: list[int] | None = None, note: str = "") -> None:
    """note: after each graph's name in the report (what part of the drafter was checked)."""
    g = torch.Generator().manual_seed(seed)
    cfg = drafter.config
    d = manifest["drafter"]
    n_feat = len(cfg.target_layer_ids) * cfg.hidden_size
    # Feature scale like real taps: mostly O(1) with a few very large outliers.
    feats = torch.randn(1, 7, n_feat, generator=g) * 4
    feats[..., :: max(1, n_feat // 7)] *= 2000
    pos = torch.arange(7)[None]
    ref_ctx = drafter.context_kv(feats, pos)
    # Draft cache buffers with 3 slots past the context, holding noise (stale rows) the block must ignore.
    block = cfg.block_size
    empty = [torch.randn(shape, generator=g).to(ref_ctx[0].dtype) for shape in drafter.cache_shapes(10)]
    ref_cache = drafter.context_into(feats, pos, empty)
    shared = SharedWeights(folder, manifest.get("shared_weights"))
    ctx_sess = make_session(folder / d["context_graph"], ["CPUExecutionProvider"], shared, prepack=False)
    feeds = {"target_hidden": feats.numpy(), "position_ids": pos.numpy()}
    feeds.update(zip(d["io"]["context"]["inputs"][2:], [c.numpy() for c in empty]))
    got_cache = ctx_sess.run(None, feeds)
    _summarise(report, f"drafter_context{note}", d["io"]["context"]["outputs"], got_cache, ref_cache)

    ids = torch.tensor([[int(torch.randint(0, cfg.vocab_size, (1,), generator=g))] + [cfg.mask_token_id] * (block - 1)])
    bpos = torch.arange(7, 7 + block)[None]
    drafter.attach_target(embed, head)
    hidden = drafter.block_hidden(drafter.embed(ids), bpos, ref_ctx)
    if vocab_ids is None:
        ref_logits = drafter.logits(hidden[:, 1:])
        ref_ids = ref_logits.argmax(-1).numpy()
    else:
        ids_t = torch.tensor(vocab_ids)
        ref_logits = drafter.logits(hidden[:, 1:], head[ids_t])
        ref_ids = ids_t[ref_logits.argmax(-1)].numpy()
    blk_sess = make_session(folder / d["block_graph"], ["CPUExecutionProvider"], shared, prepack=False)
    feeds = {"input_ids": ids.numpy(), "position_ids": bpos.numpy()}
    feeds.update(zip(d["io"]["block"]["inputs"][2:], [c.numpy() for c in ref_cache]))
    got = blk_sess.run(None, feeds)
    got_ids = got[0]
    if len(got) > 1:  # a validation copy that returns its logits: they are compared as numbers too
        _summarise(report, f"drafter_block{note}", ["draft_logits"], got[1:], [ref_logits])
    # Random weights make near-ties likely; demand most ids agree rather than all.
    report.exact(f"drafter_block{note}", "draft_ids", float((got_ids == ref_ids).mean()), needed=0.8)
