"""Codecs: bytes in, bytes out: CRC-32C checksums (`checksum`) and erasure codes, XOR and ISA-L Reed-Solomon (`erasure`, `isal`)."""
