"""Pure loss functions, one concern per file."""
from ssl_kit.losses.reconstruction import masked_mse_loss, normalize_patches

__all__ = ["masked_mse_loss", "normalize_patches"]
