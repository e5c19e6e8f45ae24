"""Linear-probe and kNN accuracy of frozen features on a labelled split.

Three feature sets are compared, so a number means something: the raw token
values (pixels), the encoder at its random initialisation (the same seed the
pretraining started from), and the pretrained encoder. Features come from
the encoder on all tokens, unaugmented, pooled per `model.pool`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from polymae.shared.masking import build_masker
from polymae.shared.modality import label_of
from polymae.shared.model import readout_tokens
from polymae.shared.trainer import pick_device

from .runs import RunParts, build_parts
from .stream import Loader, ShardStream


@torch.no_grad()
def extract(parts: RunParts, shards: list[str], model: torch.nn.Module | None, max_samples: int,
            device: torch.device, label_reader=label_of) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, records skipped as bad) for a labelled split; `model=None` gives the
    raw token values (or bags of words). `label_reader`: a record -> its label (its `cls` class)."""
    data = parts.config.data
    nothing_hidden = build_masker("random", 0.0)
    stream = ShardStream(shards, [spec._replace(masker=nothing_hidden) for spec in parts.streams],
                         batch_size=data.batch_size, train=False, seed=data.seed, split_by_rank=False,
                         label_reader=label_reader)
    features, labels, skipped = [], [], 0
    if model is not None:
        model.eval().to(device)
    for batch in Loader(stream, data.num_workers, device=device if model is not None else None):
        skipped += sum(batch.skipped.values())
        if len(batch) == 0:
            continue
        if batch.labels is None:
            raise ValueError(f"probing needs labelled shards; {shards[0]} has records without a 'cls' label")
        if model is None:
            features.append(raw_features(parts, batch))
        else:
            features.append(model.features(batch).float().cpu())
        labels.append(batch.labels)
        if sum(len(f) for f in features) >= max_samples:
            break
    return torch.cat(features)[:max_samples].numpy(), torch.cat(labels)[:max_samples].numpy(), skipped


def raw_features(parts: RunParts, batch) -> torch.Tensor:
    """The baseline features of each stream, side by side: its token values flattened (averaged
    over the real or readout tokens when samples differ in size), or for a discrete stream its
    bag of ids (counts per vocabulary entry, padding left out)."""
    columns = []
    readout = readout_tokens(batch)
    for spec in parts.streams:
        tokens = batch.streams[spec.name]
        if tokens.values is not None:
            if tokens.valid is None and readout is None:
                columns.append(tokens.values.flatten(1).float())
                continue
            # samples of different token counts: the mean over each one's real tokens (or readout tokens)
            weights = tokens.valid if tokens.valid is not None else torch.ones(tokens.values.shape[:2], dtype=torch.bool)
            if readout is not None:
                weights = weights & readout[:, batch.layout[spec.name]]
            weights = weights.unsqueeze(-1).float()
            columns.append((tokens.values.float() * weights).sum(1) / weights.sum(1).clamp_min(1))
            continue
        counts = torch.zeros(len(batch), spec.modality.vocab_size)
        weights = torch.ones(tokens.ids.shape) if tokens.valid is None else tokens.valid.float()
        columns.append(counts.scatter_add_(1, tokens.ids.cpu(), weights.cpu()))
    return torch.cat(columns, dim=1)


def linear_probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(max_iter=2000, C=1.0)
    classifier.fit(scaler.transform(train_x), train_y)
    return float((classifier.predict(scaler.transform(test_x)) == test_y).mean())


def knn_accuracy(train_x, train_y, test_x, test_y, k: int, temperature: float) -> float:
    """Cosine-similarity kNN with exp(sim / T) weighted votes (as DINO evaluates)."""
    train = F.normalize(torch.from_numpy(train_x).float(), dim=1)
    test = F.normalize(torch.from_numpy(test_x).float(), dim=1)
    train_labels = torch.from_numpy(train_y).long()
    classes = int(max(train_y.max(), test_y.max())) + 1
    sims, index = (test @ train.T).topk(min(k, len(train)), dim=1)
    votes = torch.zeros(len(test), classes).scatter_add_(1, train_labels[index], (sims / temperature).exp())
    return float((votes.argmax(1).numpy() == test_y).mean())


def probe(parts: RunParts, train_shards: list[str], val_shards: list[str]) -> dict[str, dict[str, float]]:
    """{'raw': {...}, 'random_init': {...}, 'pretrained': {...}} of linear and kNN accuracy:
    fitted on the train split and scored on the held-out one (`probe.protocol: split`), or
    the mean and std over `probe.folds` stratified folds of both splits together
    (`cross_validation`: GraphMAE's protocol for small labelled sets)."""
    cfg = parts.config.probe
    device = pick_device(parts.config.trainer.device)
    random_init = build_parts(parts.config).model
    results = {}
    for name, model in ((raw_name(parts), None), ("random_init", random_init), ("pretrained", parts.model)):
        train_x, train_y, train_skipped = extract(parts, train_shards, model, cfg.max_samples, device)
        val_x, val_y, val_skipped = extract(parts, val_shards, model, cfg.max_samples, device)
        if cfg.protocol == "cross_validation":
            results[name] = cross_validated(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]),
                                            cfg.folds, cfg.knn_k, cfg.knn_temperature, parts.config.data.seed)
        else:
            results[name] = {"linear": linear_probe_accuracy(train_x, train_y, val_x, val_y),
                             "knn": knn_accuracy(train_x, train_y, val_x, val_y, cfg.knn_k, cfg.knn_temperature),
                             "train_samples": len(train_y), "val_samples": len(val_y)}
        results[name]["skipped"] = train_skipped + val_skipped
    return results


def cross_validated(x: np.ndarray, y: np.ndarray, folds: int, knn_k: int, knn_temperature: float,
                    seed: int) -> dict[str, float]:
    """Linear and kNN accuracy over stratified folds: means, standard deviations, fold count."""
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(y).compress(np.bincount(y) > 0).min())
    if smallest < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} samples of every class; the "
                         f"rarest class has {smallest} (lower probe.folds)")
    linear, knn = [], []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        linear.append(linear_probe_accuracy(x[train], y[train], x[test], y[test]))
        knn.append(knn_accuracy(x[train], y[train], x[test], y[test], knn_k, knn_temperature))
    return {"linear": float(np.mean(linear)), "linear_std": float(np.std(linear)), "knn": float(np.mean(knn)),
            "knn_std": float(np.std(knn)), "folds": folds, "samples": len(y)}


def raw_name(parts: RunParts) -> str:
    """What the baseline row is called: raw values, or a bag of words for discrete streams only."""
    return "bag_of_words" if all(spec.modality.vocab_size for spec in parts.streams) else "raw"


@torch.no_grad()
def heldout_losses(parts: RunParts, train_shards: list[str], val_shards: list[str], device: torch.device,
                   max_batches: int = 50) -> dict[str, dict[str, float]]:
    """Each loss term on held-out shards (masks drawn as in training, seeded: the same every
    call), and, for terms that score sub-words, what a unigram model fitted on the train
    shards' sub-word frequencies scores on the very same targets: the bar a masked or
    causal LM must clear to have learnt anything beyond word frequencies."""
    data = parts.config.data
    budget = parts.config.budget

    def batches(shards):
        stream = ShardStream(shards, parts.streams, batch_size=data.batch_size, train=False, seed=data.seed,
                             split_by_rank=False, visible_budget=budget.visible, budget_alpha=budget.alpha,
                             budget_sample_streams=budget.sample_streams)
        for n, batch in enumerate(Loader(stream, data.num_workers, device=device)):
            if n >= max_batches:
                return
            if len(batch):
                yield batch

    scoring = {name: term for name, term in parts.module.objective.terms.items() if hasattr(term, "scored")}
    frequencies = {}
    for batch in batches(train_shards) if scoring else ():
        for name, term in scoring.items():
            ids, weights = term.scored(batch)
            vocab = parts.modalities[term.stream].vocab_size
            counts = frequencies.setdefault(name, torch.ones(vocab))  # add-one smoothing
            counts.index_add_(0, ids.flatten().cpu(), weights.flatten().cpu())
    module = parts.module.to(device).eval()
    sums, weights_seen, count = {}, {}, 0
    for batch in batches(val_shards):
        _, terms, _ = module(batch)
        count += 1
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        for name, term in scoring.items():
            ids, weights = term.scored(batch)
            log_p = (frequencies[name] / frequencies[name].sum()).log()
            unigram = -(log_p[ids.flatten().cpu()] * weights.flatten().cpu()).sum()
            sums[f"{name}/unigram"] = sums.get(f"{name}/unigram", 0.0) + float(unigram)
            weights_seen[name] = weights_seen.get(name, 0.0) + float(weights.sum())
    # each term's loss, and what a term measures beside it (a contrastive term's retrieval accuracy)
    results = {name: {"model": value / max(count, 1)} for name, value in sums.items() if not name.endswith("/unigram")}
    for name, term in scoring.items():  # a term summing several cross-entropies (Starbucks) sums the baseline too
        results[name]["unigram"] = getattr(term, "summands", 1) * sums[f"{name}/unigram"] / max(weights_seen[name], 1.0)
    return results


def format_heldout(results: dict) -> str:
    lines = [f"{'held-out loss':<22}{'model':>9}{'unigram':>9}"]
    for name, row in results.items():
        unigram = f"{row['unigram']:>9.3f}" if "unigram" in row else f"{'-':>9}"
        lines.append(f"{name:<22}{row['model']:>9.3f}{unigram}")
    return "\n".join(lines)


def format_probe(results: dict) -> str:
    first = next(iter(results.values()))
    skipped = f", {first['skipped']} bad records skipped" if first.get("skipped") else ""
    if "folds" in first:
        lines = [f"{'features':<14}{'linear':>15}{'kNN':>15}   ({first['folds']}-fold cross-validation over "
                 f"{first['samples']} samples, mean ± std{skipped})"]
        for name, row in results.items():
            lines.append(f"{name:<14}{row['linear']:>9.3f} ± {row['linear_std']:.3f}"
                         f"{row['knn']:>9.3f} ± {row['knn_std']:.3f}")
        return "\n".join(lines)
    lines = [f"{'features':<14}{'linear':>9}{'kNN':>9}   (train {first['train_samples']}, "
             f"held-out {first['val_samples']}{skipped})"]
    for name, row in results.items():
        lines.append(f"{name:<14}{row['linear']:>9.3f}{row['knn']:>9.3f}")
    return "\n".join(lines)
