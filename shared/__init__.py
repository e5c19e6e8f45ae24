"""What every modality uses: tokens and masks, maskers, position encodings,
the encoder-decoder, objectives, the trainer, checkpoints, config, registry.

Nothing in here imports a modality (DESIGN.md: modalities -> shared)."""
