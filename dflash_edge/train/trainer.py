"""The training loop: AdamW, warmup + cosine, fp32 master weights, clipping, resumable checkpoints."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import write_atomic, write_text_atomic
from ..errors import UserError
from ..export.drafter import DFlashDrafter, save_drafter
from .features import FeatureStore
from .objective import dflash_loss, sample_anchors


@dataclass
class TrainConfig:
    steps: int = 1000
    minutes: float | None = None       # stop early at this wall-clock budget (the schedule uses `steps`)
    lr: float = 6e-4
    warmup: float = 0.04
    batch: int = 4                     # sequences per optimizer step
    anchors: int = 64                  # blocks per sequence
    gamma: float = 7.0
    clip: float = 1.0
    eval_every: int = 100
    eval_sequences: int = 32
    negatives: int = 4096              # with a draft vocabulary: tokens outside it sampled into each softmax
    save_every: int = 100
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False                 # autocast the forward to bf16 (master weights and optimizer stay fp32)
    labels: str = "text"               # "target": learn the target's greedy choices (objective.py)
    min_weight: float = 0.01           # rows weighing less skip the LM head (see dflash_loss)
    soft_weight: float = 0.0           # share of the loss on the target's top-k distribution (soft targets)
    dpace_alpha: float | None = None   # D-PACE row weights in place of the exp(-(k-1)/gamma) decay


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.steps - warm))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def objective_options(store: FeatureStore, i: int, cfg: TrainConfig) -> dict:
    """The optional terms of the objective for sequence i: soft targets and D-PACE weights."""
    soft = None
    if cfg.soft_weight > 0:
        soft = tuple(t.to(cfg.device) for t in store.soft(i))
    return {"soft": soft, "soft_weight": cfg.soft_weight, "dpace_alpha": cfg.dpace_alpha}


def evaluate(drafter: DFlashDrafter, store: FeatureStore, seqs, ids: list[int], cfg: TrainConfig,
             feature_scale: torch.Tensor | None = None) -> dict:
    """Held-out loss and the acceptance the drafter would get on teacher-forced blocks, over the full
    vocabulary (as at inference, whatever draft vocabulary training uses), against the target's own
    choices where the feature cache has them (what a draft must match), whatever training learns."""
    drafter.eval()
    g = torch.Generator().manual_seed(1234)
    losses, accepts = [], []
    with torch.no_grad():
        for i in ids:
            s = seqs[i]
            mask = torch.tensor(s.loss_mask)
            anchors = sample_anchors(mask, drafter.config.block_size, cfg.anchors, g)
            if anchors.numel() == 0:
                continue
            with torch.autocast(device_type=cfg.device, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, info = dflash_loss(drafter, scaled(store[i], feature_scale, cfg.device),
                                         torch.tensor(s.tokens, device=cfg.device), mask.to(cfg.device),
                                         anchors.to(cfg.device), cfg.gamma,
                                         greedy=store.greedy(i).to(cfg.device) if store.has_greedy else None,
                                         **objective_options(store, i, cfg))
            losses.append(loss.item())
            accepts.append(info["accept"])
    drafter.train()
    if not losses:
        return {"loss": float("nan"), "tau_estimate": float("nan")}
    return {"loss": sum(losses) / len(losses), "tau_estimate": sum(accepts) / len(accepts)}


def feature_scale(store: FeatureStore, rows: int = 20000, seed: int = 0) -> torch.Tensor:
    """1 / RMS of every tapped feature, from a fixed sample of the store.

    Taps differ in scale by three orders of magnitude (median RMS 1.3 in an early SmolLM2 tap, 16 in a late
    one, 1,600 in a few "massive activation" channels). Through a randomly initialised fc those few channels
    carry almost all of the output, so after the RMSNorm every context position looks alike, and Adam's
    per-weight steps on their columns inject noise 1,000x larger than the signal. Training therefore sees
    features scaled to unit RMS per channel, and the scale is folded into fc when the checkpoint is written
    (fold_feature_scale), so the checkpoint takes raw taps like any z-lab drafter.
    """
    import numpy as np

    n = store.data.shape[0]
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    x = torch.from_numpy(np.asarray(store.data[idx], dtype=np.float32))
    rms = x.pow(2).mean(0).sqrt()
    return 1.0 / rms.clamp(min=1e-3)


def scaled(features: torch.Tensor, scale: torch.Tensor | None, device: str) -> torch.Tensor:
    return (features if scale is None else features * scale).to(device)


def fold_feature_scale(drafter: DFlashDrafter, scale: torch.Tensor) -> None:
    """fc(x * s) == (fc.weight * s) x: the trained drafter, made to take raw taps."""
    with torch.no_grad():
        drafter.fc.weight.mul_(scale.to(drafter.fc.weight)[None, :])


def unfold_feature_scale(drafter: DFlashDrafter, scale: torch.Tensor) -> None:
    """The inverse of fold_feature_scale: a checkpoint that takes raw taps, made to take scaled ones."""
    with torch.no_grad():
        drafter.fc.weight.div_(scale.to(drafter.fc.weight)[None, :])


def held_out_split(count: int, cfg: TrainConfig, rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """(evaluated ids, training ids): a twentieth of the sequences is held out, of which at most
    cfg.eval_sequences are evaluated. train() passes its own generator (seeded with cfg.seed) and keeps
    drawing from it; anyone else gets the same split from cfg alone."""
    if rng is None:
        rng = random.Random(cfg.seed)
    order = list(range(count))
    rng.shuffle(order)
    n_eval = max(1, len(order) // 20)
    eval_ids, train_ids = order[:n_eval], order[n_eval:] or order
    return eval_ids[:cfg.eval_sequences], train_ids  # the whole split is held out; a fixed sample keeps evals cheap


def train(drafter: DFlashDrafter, store: FeatureStore, seqs, work: Path, cfg: TrainConfig, vocab_subset=None,
          log=print, feature_scale: torch.Tensor | None = None) -> dict:
    """Train in place; resumes from work/state.pt if it exists. Returns the final metrics.

    With feature_scale, the drafter sees features * feature_scale (fold it into fc before saving)."""
    rng = random.Random(cfg.seed)
    eval_ids, train_ids = held_out_split(len(seqs), cfg, rng)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, history, metrics = 0, [], {}
    state_path = work / "state.pt"
    if state_path.is_file():
        # weights_only: a state.pt is data; a planted pickle must not run code.
        try:
            state = torch.load(state_path, map_location=cfg.device, weights_only=True)
        except Exception as e:  # torch raises UnpicklingError or RuntimeError for foreign or broken files
            raise UserError(f"{state_path} is not a training state this dflash-train wrote ({type(e).__name__}); "
                            f"remove it or pass another --work") from None
        mine = drafter.state_dict()
        if set(state["model"]) != set(mine) or any(v.shape != mine[k].shape for k, v in state["model"].items()):
            raise UserError(f"{state_path} holds the training state of a differently shaped drafter; remove it or "
                            f"pass another --work")
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        rng.setstate(state["rng"])
        log(f"  resumed at step {step}")
    if step == 0:
        metrics = evaluate(drafter, store, seqs, eval_ids, cfg, feature_scale)
        history.append({"step": 0, **metrics})
        log(f"  eval before training: loss {metrics['loss']:.3f}, tau estimate {metrics['tau_estimate']:.2f}")
    g = torch.Generator().manual_seed(cfg.seed + step)
    outside = None
    if vocab_subset is not None and cfg.negatives:
        keep = torch.ones(drafter.config.vocab_size, dtype=torch.bool, device=vocab_subset.device)
        keep[vocab_subset] = False
        outside = keep.nonzero().flatten()
    drafter.train()
    t0, tokens, started = time.perf_counter(), 0, step
    while step < cfg.steps:
        if cfg.minutes is not None and time.perf_counter() - t0 > cfg.minutes * 60:
            log(f"  time budget of {cfg.minutes} min reached at step {step}")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.batch):
            i = train_ids[rng.randrange(len(train_ids))]
            s = seqs[i]
            mask = torch.tensor(s.loss_mask)
            anchors = sample_anchors(mask, drafter.config.block_size, cfg.anchors, g)
            if anchors.numel() == 0:
                continue
            negatives, weight = None, 1.0
            if outside is not None and outside.numel():
                k = min(cfg.negatives, outside.numel())
                negatives = outside[torch.randint(outside.numel(), (k,), generator=g).to(outside.device)]
                weight = outside.numel() / k
            with torch.autocast(device_type=cfg.device, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, info = dflash_loss(drafter, scaled(store[i], feature_scale, cfg.device),
                                         torch.tensor(s.tokens, device=cfg.device), mask.to(cfg.device),
                                         anchors.to(cfg.device), cfg.gamma, vocab_subset, negatives, weight,
                                         greedy=store.greedy(i).to(cfg.device) if cfg.labels == "target" else None,
                                         min_weight=cfg.min_weight, **objective_options(store, i, cfg))
            (loss / cfg.batch).backward()
            total += loss.item() / cfg.batch
            tokens += info["rows"]
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        step += 1
        if step % 10 == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - t0
            rate = (step - started) / elapsed
            eta = (cfg.steps - step) / rate if rate else 0
            log(f"  step {step}/{cfg.steps} loss {total:.3f} lr {lr_at(step, cfg):.2e} "
                f"{tokens / elapsed:.0f} tok/s ETA {eta / 60:.1f} min")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = evaluate(drafter, store, seqs, eval_ids, cfg, feature_scale)
            history.append({"step": step, "train_loss": total, **metrics})
            log(f"  eval step {step}: loss {metrics['loss']:.3f}, tau estimate {metrics['tau_estimate']:.2f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(drafter, opt, step, history, rng, work)
    if step % cfg.save_every:
        save_state(drafter, opt, step, history, rng, work)
    write_text_atomic(work / "history.json", json.dumps({"config": asdict(cfg), "history": history}, indent=1))
    return {"step": step, "history": history, **metrics}


def save_state(drafter, opt, step, history, rng, work: Path) -> None:
    state = {"model": drafter.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "history": history, "rng": rng.getstate()}
    write_atomic(work / "state.pt", lambda f: torch.save(state, f))


def is_checkpoint(folder: Path) -> bool:
    """A drafter checkpoint folder: its config.json says DFlash and nothing but checkpoint files are in it."""
    allowed = {"config.json", "training_report.json", "draft_vocab.json", "README.md"}
    try:
        config = json.loads((folder / "config.json").read_text())
        files = list(folder.iterdir())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and "dflash_config" in config
            and all(f.is_file() and (f.name in allowed or f.suffix == ".safetensors") for f in files))


def write_checkpoint(drafter: DFlashDrafter, output: Path) -> None:
    """The z-lab checkpoint (bf16 safetensors + config.json), written atomically: a checkpoint already at
    `output` is renamed aside, the new one renamed in, and only then the old one deleted."""
    import shutil

    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_drafter(drafter, tmp, dtype=torch.bfloat16)
    if output.exists():
        old = output.parent / f".{output.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old)
    else:
        tmp.rename(output)
