"""The model layer: loading PaliGemma (a checkpoint or a random-weight preset) and running batches."""
