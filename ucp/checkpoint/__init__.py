"""The public hooks: the Checkpointer, its save and load paths and their results."""
