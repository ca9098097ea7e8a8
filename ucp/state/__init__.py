"""What a training state is: capture into pieces, optimizer-state mapping, RNG, dtype names. No I/O."""
