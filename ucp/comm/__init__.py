"""Communication over torch.distributed: collectives with named phases and rank-uniform errors."""
