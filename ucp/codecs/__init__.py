"""Codecs: bytes in, bytes out (checksums now; compression and erasure codes join them)."""
