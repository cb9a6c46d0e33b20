"""Methods as LightningModules, and a tiny registry name -> class."""
from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.ibot import IBOT
from ssl_kit.methods.lomar import LoMaR
from ssl_kit.methods.mae import MAE
from ssl_kit.methods.mpl import MetaPseudoLabels
from ssl_kit.methods.soft_teacher import SoftTeacher
from ssl_kit.methods.u2pl import U2PL
from ssl_kit.methods.uda import UDA

METHODS: dict[str, type[SSLMethod]] = {"mae": MAE, "lomar": LoMaR, "ibot": IBOT, "uda": UDA, "mpl": MetaPseudoLabels,
                                  "u2pl": U2PL, "soft_teacher": SoftTeacher}

__all__ = ["METHODS", "IBOT", "LoMaR", "MAE", "MetaPseudoLabels", "SSLMethod", "SoftTeacher", "U2PL", "UDA"]
