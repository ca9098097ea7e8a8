"""The checkpoint language (UCL): grammar shipped as package data, parsed with Lark."""
