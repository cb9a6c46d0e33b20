"""Methods as LightningModules, and a tiny registry name -> class."""
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.ibot import IBOT
from ssl_kit.methods.lomar import LoMaR
from ssl_kit.methods.mae import MAE

METHODS: dict[str, type[SSLMethod]] = {"mae": MAE, "lomar": LoMaR, "ibot": IBOT}

__all__ = ["METHODS", "IBOT", "LoMaR", "MAE", "SSLMethod"]
