"""Storage: files, byte ranges and atomic commit. Knows keys and bytes, not layouts."""
