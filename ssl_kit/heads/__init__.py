"""Heads attached to the shared encoder."""
from ssl_kit.heads.mae_decoder import MAEDecoder

__all__ = ["MAEDecoder"]
