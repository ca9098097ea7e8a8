"""Element types by name, without importing torch: ucp's names, sizes and safetensors codes."""

from __future__ import annotations

from ucp.errors import SpecError

#: name -> (itemsize in bytes, safetensors dtype code)
DTYPES: dict[str, tuple[int, str]] = {
    "float64": (8, "F64"),
    "float32": (4, "F32"),
    "float16": (2, "F16"),
    "bfloat16": (2, "BF16"),
    "float8_e4m3fn": (1, "F8_E4M3"),
    "float8_e5m2": (1, "F8_E5M2"),
    "int64": (8, "I64"),
    "int32": (4, "I32"),
    "int16": (2, "I16"),
    "int8": (1, "I8"),
    "uint64": (8, "U64"),
    "uint32": (4, "U32"),
    "uint16": (2, "U16"),
    "uint8": (1, "U8"),
    "bool": (1, "BOOL"),
    "complex64": (8, "C64"),
}

SAFETENSORS_TO_NAME = {code: name for name, (_, code) in DTYPES.items()}


def dtype_name(dtype) -> str:
    """ucp's name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``), without importing torch."""
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype``; raises SpecError for names ucp does not know."""
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise SpecError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}") from None
