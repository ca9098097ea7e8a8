"""Pure planning: which rank writes which piece, and which bytes a rank reads to fill its tensors."""
