"""The streaming WebDataset pipeline and the runnable pipelines (pretrain, probe, reconstruct, shard)."""
