"""The memory side of a save: capture (flatten the training state), values, RNG."""
