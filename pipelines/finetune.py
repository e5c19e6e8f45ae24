"""`polymae finetune`: train a pretrained encoder on labels with MAE's fine-tuning recipe.

    polymae finetune RUN_OR_FOLDER [RECIPE] [dotted.key=value ...] [--from-scratch]

The start is a polymae run or checkpoint folder (its own recipe, config.yaml, is
the base) or a local Hugging Face folder that `model.init_from` imports (then
RECIPE gives the rest). RECIPE and the overrides lay their sections over the
base; their `finetune:` section is this command's own (`FinetuneConfig`). The
encoder keeps its weights (`model.init_from`, the mechanism every recipe starts
from weights with), its decoders are left out of the optimisation, and a task
head reads `model.features(batch)`, the one vector per sample probes read too:

- classification: a linear head, cross-entropy with label smoothing; mixup and
  cutmix mix the batch with its reverse (timm's pairing) and their soft targets;
- multilabel: one sigmoid per label, BCE, mean AUC (labels: a JSON list of 0/1);
- regression: one output, mean squared error, RMSE (labels: a JSON number).
  A sample that is about some of its tokens (a stream's `readout` field, such as the seed
  of a subgraph cut around it) is pooled over those, so a per-node task is classification.

MAE's recipe is the default: AdamW (0.9, 0.999), layer-wise lr decay (a block's
lr is `layer_decay ** (depth + 1 - its layer)` times the head's), stochastic
depth in the encoder (`model.drop_path`), warmup then cosine, no weight decay on
norms, biases, tokens and position tables; `augment:` adds each stream modality's own training
augmentations, by the names the modality gives them (`Modality.with_augmentations`), drawn from
each sample's generator so a run stays deterministic. `mode: linear` is MAE's linear probe
instead: the encoder frozen, a BatchNorm without affine before the linear head,
SGD with momentum, or MAE's LARS (`optimizer: lars`). `--from-scratch` trains the same architecture from random
init on the same budget: the comparison that says what pretraining bought.

The run folder holds metrics.jsonl and TensorBoard scalars of the training loss
and every evaluation, checkpoints (resume: `--resume RUN`), confusion.png
(classification) and summary.json with the best and the last held-out metrics.
Records with a bad label are refused before training, naming the record.
"""
from __future__ import annotations

import functools
import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from polymae.shared import distributed
from polymae.shared.checkpoint import resolve_checkpoint
from polymae.shared.config import Config, as_dict, build, dump_config, find_config, merge, parse_override
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.masking import build_masker
from polymae.shared.modality import label_of
from polymae.shared.trainer import Trainer, make_adamw, no_weight_decay, warmup_cosine

from .pretrain import batches_per_rank
from .probe import extract
from .runs import RunLock, RunParts, build_parts, run_folder, split_shards, stream_modalities
from .stream import Loader, ShardStream, read_shard

TASKS = ("classification", "multilabel", "regression")
OPTIMIZERS = ("adamw", "sgd", "lars")


@dataclass
class FinetuneConfig:
    """The `finetune:` section of a fine-tuning recipe (MAE's fine-tuning defaults)."""
    task: str = "classification"      # classification | multilabel | regression
    mode: str = "full"                # full: every encoder weight trains | linear: MAE's linear probe (frozen)
    label: str = "cls"                # the record file holding the label: cls (an integer), or *.json
    classes: int | None = None        # None: read off the labels of both splits
    steps: int = 500
    batch_size: int | None = None     # None: the run's data.batch_size
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str | None = None      # adamw | sgd | lars; None: adamw in full mode, sgd in linear mode.
    #                                   MAE's linear probe: lars, lr 0.1 * batch_size / 256, weight_decay 0
    momentum: float = 0.9             # SGD's and LARS's
    trust_coefficient: float = 0.001  # LARS's: a weight matrix's step is this share of its norm (times lr)
    layer_decay: float = 0.75         # MAE: 0.65 (ViT-B) to 0.75 (ViT-L/H); 1.0 turns it off
    drop_path: float = 0.1            # the encoder's stochastic depth (model.drop_path) while fine-tuning
    label_smoothing: float = 0.1
    head_norm: str = "batch"          # batch | layer | none: the pooled features' normalisation before the head.
    #                                   MAE fine-tunes after a LayerNorm (layer); pooled features of a small
    #                                   encoder share a large per-dimension offset across samples that a
    #                                   LayerNorm keeps and a BatchNorm removes: on 8x8 images a head after a
    #                                   LayerNorm sat at chance for 70 steps, after a BatchNorm it learnt at once
    mixup: float = 0.0                # Beta(alpha, alpha) mixing weight of mixup (MAE: 0.8); 0 = off
    cutmix: float = 0.0               # Beta(alpha, alpha) of cutmix on the token grid (MAE: 1.0); 0 = off
    switch_prob: float = 0.5          # with both on: the share of batches cutmixed instead of mixed up
    augment: dict = field(default_factory=dict)  # each stream modality's own training augmentations, by the
    #                                   names it gives them (Modality.with_augmentations), drawn per sample
    ema: float | None = None          # decay of an exponential moving average of the weights, evaluated too
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"finetune.task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.head_norm not in ("batch", "layer", "none"):
            raise ConfigError(f"finetune.head_norm must be batch, layer or none; got {self.head_norm!r}")
        if self.optimizer not in (None, *OPTIMIZERS):
            raise ConfigError(f"finetune.optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if not 0 < self.trust_coefficient <= 1 or not 0 <= self.momentum < 1:
            raise ConfigError("finetune.trust_coefficient must be in (0, 1] and momentum in [0, 1)")
        if self.mode not in ("full", "linear"):
            raise ConfigError(f"finetune.mode must be full or linear; got {self.mode!r}")
        for name in ("steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.classes is not None and self.classes < 1:
            raise ConfigError(f"finetune.classes must be >= 1, got {self.classes}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.min_lr < 0 or self.weight_decay < 0:
            raise ConfigError("finetune.lr must be positive and finite, min_lr and weight_decay >= 0")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.switch_prob <= 1:
            raise ConfigError("finetune.label_smoothing must be in [0, 1) and switch_prob in [0, 1]")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("finetune.mixup and finetune.cutmix are Beta alphas: >= 0 (0 turns one off)")
        if (self.mixup or self.cutmix) and self.task == "regression":
            raise ConfigError("finetune.mixup and cutmix mix class targets; a regression task has none")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"finetune.ema must be in (0, 1), got {self.ema}")


# -- the recipe -----------------------------------------------------------------------------------------


def finetune_recipe(start: str | Path, recipe: str | None = None, overrides: list[str] = (),
                    from_scratch: bool = False) -> tuple[Config, FinetuneConfig]:
    """The fine-tuning run's Config and FinetuneConfig (see the module docstring)."""
    start = Path(start)
    if (start / "config.json").is_file():  # a Hugging Face folder: the recipe says what it is
        if recipe is None:
            raise ConfigError(f"{start} is a Hugging Face folder: give the recipe to fine-tune it with "
                              "(its modality, data and model settings)")
        values = {}
    else:
        values = yaml.safe_load((resolve_checkpoint(start) / "config.yaml").read_text()) or {}
    if recipe is not None:
        path = find_config(recipe)
        extra = yaml.safe_load(path.read_text()) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
        values = merge(values, extra)
    for text in overrides:
        values = merge(values, parse_override(text))
    ft = build(FinetuneConfig, values.pop("finetune", None) or {}, "finetune")
    kind = "scratch" if from_scratch else "linear" if ft.mode == "linear" else "finetune"
    values = merge(values, {"name": f"{values.get('name', 'mae')}_{kind}",
                            "model": {"init_from": None if from_scratch else str(start),
                                      "drop_path": 0.0 if ft.mode == "linear" else ft.drop_path},
                            "trainer": {"seed": ft.seed}})  # from scratch, the seed draws the encoder too
    config = build(Config, values)
    config.stream_configs()
    return config, ft


def resumed_finetune_recipe(run_dir: Path) -> tuple[Config, FinetuneConfig]:
    """A fine-tuning run's own recipe, as it wrote it (config.yaml and finetune.yaml), to continue it."""
    files = [run_dir / "config.yaml", run_dir / "finetune.yaml"]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {file.name} there (not a polymae finetune run)")
    config = build(Config, yaml.safe_load(files[0].read_text()) or {})
    return config, build(FinetuneConfig, yaml.safe_load(files[1].read_text()) or {}, "finetune")


# -- labels ---------------------------------------------------------------------------------------------


def record_label(sample: dict, ft: FinetuneConfig):
    """A record's label as the task reads it: an int class, a list of 0/1, or a number; None if
    absent; BadInput ("bad_label") when it is not what the task reads."""
    if ft.label == "cls":
        return label_of(sample)
    raw, key = sample.get(ft.label), sample.get("__key__", "?")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(key, f"its {ft.label} is not JSON", "bad_label") from None
    if ft.task == "regression" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BadInput(key, f"a regression label is one number, its {ft.label} holds {value!r}", "bad_label")
    if ft.task == "multilabel" and not (isinstance(value, list) and all(v in (0, 1) for v in value)):
        raise BadInput(key, f"a multi-label label is a list of 0/1, its {ft.label} holds {value!r}", "bad_label")
    if ft.task == "classification" and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadInput(key, f"a class is an integer, its {ft.label} holds {value!r}", "bad_label")
    return value


def label_summary(shards: list[str], ft: FinetuneConfig) -> dict:
    """Every record's label read once (the tar only, nothing decoded), so that a record without
    a label, a class outside the head's or a label vector of another length stops the run
    before training with the record's name, not a step into it. Also the head's output count
    and, for regression, the values' mean and std (the head predicts standardised values)."""
    classes, lengths, values, count = set(), set(), [], 0
    for shard in shards:
        for sample in read_shard(shard):
            where = f"record {sample['__key__']!r} of {shard}"
            try:
                label = record_label(sample, ft)
            except BadInput as error:
                raise ConfigError(f"{where}: {error.problem}") from None
            if label is None:
                raise ConfigError(f"polymae finetune needs labels: {where} has no '{ft.label}' (and maybe others; "
                                  f"shards: {', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''})")
            count += 1
            if ft.task == "classification":
                if label < 0 or (ft.classes is not None and label >= ft.classes):
                    raise ConfigError(f"{where}: class {label} is outside the head's 0..{(ft.classes or 1) - 1}")
                classes.add(label)
            elif ft.task == "regression":
                values.append(float(label))
            elif ft.task == "multilabel":
                lengths.add(len(label))
                if len(lengths) > 1 or (ft.classes is not None and len(label) != ft.classes):
                    raise ConfigError(f"{where}: its label vector has {len(label)} entries, the others "
                                      f"{ft.classes or sorted(lengths - {len(label)})}")
    outputs = 1 if ft.task == "regression" else ft.classes or (max(classes) + 1 if classes else lengths.pop())
    spread = (float(np.mean(values)), float(np.std(values)) or 1.0) if values else (0.0, 1.0)
    return {"records": count, "outputs": outputs, "value_scale": spread}


# -- the model -----------------------------------------------------------------------------------------


class Finetuning(nn.Module):
    """The pretrained model's features -> the task head -> the task's loss; what the Trainer optimises."""

    def __init__(self, model: nn.Module, head: nn.Module, ft: FinetuneConfig, value_scale: tuple[float, float] = (0, 1)):
        super().__init__()
        self.model, self.head, self.ft = model, head, ft
        # regression: the head predicts standardised values (a head initialised near zero starts at the mean)
        self.value_mean, self.value_std = value_scale

    def predict(self, batch) -> torch.Tensor:
        """The head's outputs: logits, or for regression the values in their own units."""
        out = self.head(self.model.features(batch))
        return out * self.value_std + self.value_mean if self.ft.task == "regression" else out

    def forward(self, batch):
        ft = self.ft
        targets = self.targets(batch)
        if self.training and (ft.mixup or ft.cutmix):
            batch, targets = self.mix(batch, targets)
        logits = self.head(self.model.features(batch)).float()
        if ft.task == "regression":
            loss = F.mse_loss(logits.squeeze(1), (targets - self.value_mean) / self.value_std)
        elif ft.task == "multilabel":
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            loss = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
        return loss, {}, Predictions(logits)

    def targets(self, batch) -> torch.Tensor:
        """Float targets: smoothed one-hot classes, label vectors, or values."""
        labels = batch.labels
        if self.ft.task != "classification":
            return labels.float()
        classes = self.head[-1].out_features
        smooth = self.ft.label_smoothing if self.training else 0.0
        return F.one_hot(labels.long(), classes).float() * (1 - smooth) + smooth / classes

    def mix(self, batch, targets):
        """Mixup or cutmix of each sample with the batch's reverse, on the token values (the same
        as mixing pixels: patchifying is linear); cutmix swaps a box of the token grid, so its
        box edges fall on patch edges. The targets mix by the share each sample keeps."""
        ft = self.ft
        cut = ft.cutmix > 0 and (ft.mixup == 0 or torch.rand(()).item() < ft.switch_prob)
        alpha = ft.cutmix if cut else ft.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        streams = {}
        for name, tokens in batch.streams.items():
            if tokens.values is None or tokens.valid is not None:
                raise ConfigError(f"finetune.mixup/cutmix mix token values of equal-sized samples; stream "
                                  f"{name!r} has {'ids' if tokens.values is None else 'padded samples'}")
            values = tokens.values
            if cut:
                if tokens.grid is None or len(tokens.grid) != 2:
                    raise ConfigError(f"finetune.cutmix cuts boxes of a 2D token grid; stream {name!r} has grid "
                                      f"{tokens.grid}")
                inside, lam = cutmix_box(tokens.grid, lam, values.device)
                mixed = torch.where(inside.view(1, -1, 1), values.flip(0), values)
            else:
                mixed = lam * values + (1 - lam) * values.flip(0)
            streams[name] = replace(tokens, values=mixed)
        return replace(batch, streams=streams), lam * targets + (1 - lam) * targets.flip(0)


def cutmix_box(grid: tuple[int, int], lam: float, device) -> tuple[torch.Tensor, float]:
    """A box of about (1 - lam) of the grid at a uniform centre, clipped to the grid (CutMix); the
    tokens in it [rows * cols] and the share of tokens outside it (the mixing weight it gives)."""
    rows, cols = grid
    cut = math.sqrt(1 - lam)
    h, w = round(rows * cut), round(cols * cut)
    cy, cx = torch.randint(rows, ()).item(), torch.randint(cols, ()).item()
    top, bottom = max(cy - h // 2, 0), min(cy + h - h // 2, rows)
    left, right = max(cx - w // 2, 0), min(cx + w - w // 2, cols)
    inside = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    inside[top:bottom, left:right] = True
    return inside.flatten(), 1 - (bottom - top) * (right - left) / (rows * cols)


@dataclass
class Predictions:
    """A fine-tuning step's outputs (the Trainer keeps the last ones; nothing is drawn of them)."""
    logits: torch.Tensor

    def map(self, fn):
        return Predictions(fn(self.logits))


def task_head(width: int, outputs: int, mode: str, norm: str = "batch") -> nn.Sequential:
    """MAE's heads: a linear layer initialised near zero (std 2e-5) for fine-tuning, std 0.01 for the
    linear probe, after the features' normalisation `norm`: a BatchNorm (without affine for the
    linear probe, as MAE's), MAE's fine-tuning LayerNorm ("layer"), or none."""
    linear = nn.Linear(width, outputs)
    nn.init.trunc_normal_(linear.weight, std=2e-5 if mode == "full" else 0.01)
    nn.init.zeros_(linear.bias)
    if mode == "linear":
        return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), linear)
    if norm == "batch":
        return nn.Sequential(nn.BatchNorm1d(width, eps=1e-6), linear)
    return nn.Sequential(nn.LayerNorm(width, eps=1e-6), linear) if norm == "layer" else nn.Sequential(linear)


LAYER_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers|norms|activations)\.(\d+)\.")


def layer_of(name: str, depth: int) -> int:
    """A parameter's layer for layer-wise lr decay: 0 for what enters the encoder (input adapters,
    cls and mask tokens, positions), i + 1 for the encoder's block or GNN layer i, depth + 1 for
    what follows (the final norm, the head)."""
    found = LAYER_INDEX.search(name)
    if found:
        return int(found.group(1)) + 1
    if "input_adapters" in name or name.split(".")[-1].endswith("_token") or "position" in name:
        return 0
    return depth + 1


def layer_decay_groups(module: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups by (layer, decayed or not), each with its `lr_scale`."""
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    depth = max((int(m.group(1)) + 1 for name, _ in trained if (m := LAYER_INDEX.search(name))), default=0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in trained:
        layer, decayed = layer_of(name, depth), not no_weight_decay(name, param)
        group = groups.setdefault((layer, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                                     "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())


def leave_out_unused(model: nn.Module, batch) -> int:
    """Freeze what `features` does not reach (the decoders, a mask token): a backward pass of one
    batch's features finds them. Returns how many parameters were left out."""
    model.zero_grad(set_to_none=True)
    model.features(batch).float().sum().backward()
    unused = 0
    for param in model.parameters():
        if param.grad is None:
            param.requires_grad_(False)
            unused += param.numel()
    model.zero_grad(set_to_none=True)
    return unused


# -- evaluation ------------------------------------------------------------------------------------------


class Predictor(nn.Module):
    """What `probe.extract` reads from a model, `features(batch)`: here the head's outputs."""

    def __init__(self, finetuning: Finetuning):
        super().__init__()
        self.finetuning = finetuning

    def features(self, batch) -> torch.Tensor:
        return self.finetuning.predict(batch)


def metrics(task: str, outputs: np.ndarray, targets: np.ndarray) -> dict:
    """Held-out metrics: top-1 and macro-F1 (classification), mean AUC over the labels with both
    values present (multilabel), RMSE and MAE (regression)."""
    from sklearn.metrics import f1_score, roc_auc_score

    if task == "classification":
        predicted = outputs.argmax(1)
        return {"top1": float((predicted == targets).mean()),
                "macro_f1": float(f1_score(targets, predicted, average="macro", zero_division=0))}
    if task == "multilabel":
        aucs = [roc_auc_score(targets[:, j], outputs[:, j]) for j in range(targets.shape[1])
                if 0 < targets[:, j].sum() < len(targets)]
        return {"mean_auc": float(np.mean(aucs)) if aucs else float("nan"), "labels_scored": len(aucs)}
    error = outputs[:, 0] - targets
    return {"rmse": float(np.sqrt(np.mean(error ** 2))), "mae": float(np.mean(np.abs(error)))}


HEADLINE = {"classification": "top1", "multilabel": "mean_auc", "regression": "rmse"}


def better(task: str, a: float, b: float | None) -> bool:
    return b is None or (a < b if task == "regression" else a > b)


def confusion_picture(outputs: np.ndarray, targets: np.ndarray, path: Path) -> None:
    """The held-out confusion matrix as a PNG: rows true, columns predicted, shaded by row share."""
    from PIL import Image, ImageDraw

    classes = outputs.shape[1]
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (targets.astype(np.int64), outputs.argmax(1)), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    cell, margin = 36, 40
    image = Image.new("RGB", (margin + classes * cell, margin + classes * cell), "white")
    draw = ImageDraw.Draw(image)
    for i in range(classes):
        draw.text((margin + i * cell + cell // 3, 12), str(i), fill="black")   # predicted
        draw.text((12, margin + i * cell + cell // 3), str(i), fill="black")   # true
        for j in range(classes):
            shade = int(255 * (1 - share[i, j]))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 4, box[1] + cell // 3), str(counts[i, j]), fill="black" if shade > 110 else "white")
    image.save(path)


# -- the trainer -------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """MAE's LARS (its util/lars.py, for the linear probe): SGD with momentum whose step of a weight
    matrix (ndim > 1) is its gradient plus weight decay rescaled to `trust_coefficient` times the
    weight's norm; vectors (norms, biases) take the plain gradient. The state is `mu`, the momentum."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for param in group["params"]:
                update = param.grad
                if update is None:
                    continue
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0, torch.where(
                        update_norm > 0, group["trust_coefficient"] * param_norm / update_norm, one), one)
                    update = update.mul(trust)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                state["mu"].mul_(group["momentum"]).add_(update)
                param.add_(state["mu"], alpha=-group["lr"])
        return loss


class FinetuneTrainer(Trainer):
    """The shared Trainer with layer-wise lr scales, SGD for the linear probe, an optional EMA of
    the weights, and a held-out evaluation every `eval_every` steps and at the end. A resumed
    run continues its weights, optimiser and data order bitwise as pretraining does; the EMA
    is not checkpointed and restarts from the resumed weights, and best/last cover the
    evaluations since the resume."""

    def __init__(self, module: Finetuning, config, run_dir: Path, ft: FinetuneConfig, evaluate, **kwargs):
        super().__init__(module, config, run_dir, **kwargs)
        self.ft, self.evaluate = ft, evaluate
        groups = layer_decay_groups(self.model, config.weight_decay, ft.layer_decay if ft.mode == "full" else 1.0)
        optimizer = ft.optimizer or ("adamw" if ft.mode == "full" else "sgd")
        if optimizer == "lars":
            self.optimizer = LARS(groups, lr=config.lr, momentum=ft.momentum, trust_coefficient=ft.trust_coefficient)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=ft.momentum)
        else:
            self.optimizer = make_adamw(groups, lr=config.lr, betas=tuple(config.betas))
        self.ema = torch.optim.swa_utils.AveragedModel(
            module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ft.ema)) if ft.ema else None
        self.evaluations: list[dict] = []

    def set_lr(self) -> float:
        c = self.config
        lr = warmup_cosine(self.step, c.warmup_steps, c.max_steps, c.lr, c.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def after_step(self, loss, parts, batch, outputs) -> bool:
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        done = super().after_step(loss, parts, batch, outputs)
        if self.step % self.ft.eval_every == 0 or done:
            self.run_evaluation()
        return done

    def run_evaluation(self) -> None:
        """Rank 0 scores the held-out split (the others wait); logged beside the training loss."""
        if self.context.is_main:
            models = {"": self.model}
            if self.ema is not None:
                models["ema_"] = self.ema.module
            record = {"step": self.step}
            for prefix, model in models.items():
                scores, _ = self.evaluate(getattr(model, "module", model))
                record.update({prefix + k: v for k, v in scores.items()})
            model = getattr(self.model, "module", self.model)
            model.train()
            self.evaluations.append(record)
            self.metrics_file.write(json.dumps({"eval": record}) + "\n")
            self.metrics_file.flush()
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"val/{key}", value, self.step)
            self.log(f"step {self.step}: held-out " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                                if k != "step"))
        distributed.barrier()


# -- the command ----------------------------------------------------------------------------------------------


def finetune(config: Config, ft: FinetuneConfig, resume: Path | None = None) -> dict:
    """Rank 0 holds the run folder's lock (a resumed one from the start, a new one once claimed)."""
    context = distributed.setup(config.trainer.device)
    try:
        with ExitStack() as held:
            if resume and context.is_main:
                held.enter_context(RunLock(Path(resume)))
            return run(config, ft, context, resume, held)
    finally:
        distributed.teardown()


def run(config: Config, ft: FinetuneConfig, context, resume: Path | None, held: ExitStack) -> dict:
    modalities = stream_modalities(config)
    for modality in modalities.values():  # a key no stream's modality names stops the run here
        modality.with_augmentations(ft.augment)
    train_shards, val_shards = split_shards(config, modalities)
    if not val_shards:
        raise ConfigError("fine-tuning scores a labelled held-out split: set data.val_shards or data.val_fraction")
    labels, held_out = label_summary(train_shards, ft), label_summary(val_shards, ft)  # scales from train only
    if ft.task == "multilabel" and labels["outputs"] != held_out["outputs"]:
        raise ConfigError(f"the train split's label vectors have {labels['outputs']} entries, the held-out "
                          f"split's {held_out['outputs']}")
    labels["outputs"] = max(labels["outputs"], held_out["outputs"])
    labels["records"] += held_out["records"]
    parts = build_parts(config, modalities=modalities)  # the start's weights through model.init_from
    nothing_hidden = build_masker("random", 0.0)  # the encoder reads every token
    streams = [spec._replace(masker=nothing_hidden) for spec in parts.streams]
    data = config.data
    batch_size = ft.batch_size or data.batch_size
    eval_parts = RunParts(replace(config, data=replace(data, batch_size=batch_size)), streams, parts.module)

    label_reader = functools.partial(record_label, ft=ft)  # a partial of a module function: it pickles to workers
    first = next(iter(Loader(ShardStream(val_shards, streams, batch_size=min(batch_size, 8), train=False,
                                         split_by_rank=False, label_reader=label_reader), 0)))
    model = parts.model
    if ft.mode == "linear":
        model.requires_grad_(False)
        unused = 0
    else:
        unused = leave_out_unused(model, first)
    with torch.no_grad():
        width = model.features(first).shape[1]
    torch.manual_seed(ft.seed)
    module = Finetuning(model, task_head(width, labels["outputs"], ft.mode, ft.head_norm), ft, labels["value_scale"])

    def evaluate(finetuned: Finetuning) -> tuple[dict, tuple]:
        outputs, targets, _ = extract(eval_parts, val_shards, Predictor(finetuned), 10 ** 9, context.device,
                                      label_reader)
        return metrics(ft.task, outputs, targets), (outputs, targets)

    augmented = [spec._replace(modality=spec.modality.with_augmentations(ft.augment)) for spec in streams]
    stream = ShardStream(train_shards, augmented, batch_size=batch_size, train=True, shuffle_buffer=data.shuffle_buffer,
                         seed=ft.seed, resampled=data.resampled, label_reader=label_reader,  # equal steps per rank:
                         batches_per_epoch=batches_per_rank(eval_parts.config, train_shards, context.world_size),
                         cache_bytes=data.cache_mb * 2 ** 20)
    loader = Loader(stream, data.num_workers, device=context.device)

    def batches(epoch: int, start: int):
        stream.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= start:
                yield batch

    trainer_config = replace(config.trainer, max_steps=ft.steps, max_minutes=None, lr=ft.lr, min_lr=ft.min_lr,
                             warmup_steps=ft.warmup_steps, weight_decay=ft.weight_decay, betas=ft.betas,
                             ckpt_every=min(config.trainer.ckpt_every, ft.steps), seed=ft.seed)
    run_dir = run_folder(config, context, resume, held)
    trainer = FinetuneTrainer(module, trainer_config, run_dir, ft, evaluate, config_text=dump_config(config),
                              context=context)
    if resume and not trainer.resume():
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there to resume from")
    if context.is_main:
        (run_dir / "config.yaml").write_text(dump_config(config))
        (run_dir / "finetune.yaml").write_text(yaml.safe_dump(as_dict(ft), sort_keys=False))
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        start = config.model.init_from or "random init (--from-scratch)"
        print(f"run folder: {run_dir}  ({ft.task}, {labels['outputs']} outputs, {labels['records']} labelled "
              f"records; from {start}; {trained / 1e6:.2f}M parameters trained, {unused / 1e6:.2f}M left out)")
    summary = trainer.fit(batches)
    if not context.is_main:
        return summary
    if not trainer.evaluations:  # a finished run resumed: nothing trained, score what it holds
        trainer.evaluations.append({"step": trainer.step, **evaluate(module)[0]})
    headline = HEADLINE[ft.task]
    best = None
    for record in trainer.evaluations:
        if better(ft.task, record[headline], best and best[headline]):
            best = record
    summary.update(run_dir=str(run_dir), task=ft.task, mode=ft.mode, start=config.model.init_from,
                   last=trainer.evaluations[-1], best=best, evaluations=trainer.evaluations)
    if ft.task == "classification":
        _, (outputs, targets) = evaluate(module)
        confusion_picture(outputs, targets, run_dir / "confusion.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"fine-tuned {summary['steps']} steps in {summary['train_seconds']:.0f}s: held-out {headline} last "
          f"{summary['last'][headline]:.4f}, best {best[headline]:.4f} (step {best['step']}); {run_dir}")
    return summary
