"""Everything about the shared ViT, for methods and evaluation alike.

* :mod:`~ssl_kit.encoders.factory`: the timm VisionTransformer for any image / patch size (presets, sin-cos position
  table, MAE / timm inits, the random baseline of a method's network, the attention kernel per sequence length);
* :mod:`~ssl_kit.encoders.tokens`: patchify, random and block masks, windows of patches;
* :mod:`~ssl_kit.encoders.rpe`: iRPE relative-position attention and the timm-registered ``vit_irpe_patch16_224``
  (registered when this package is imported);
* :mod:`~ssl_kit.encoders.features`: its readouts ([CLS], mean patch token) and feature-spread figures;
* :mod:`~ssl_kit.encoders.io`: the timm-loadable export, the checkpoint record, and :func:`load_encoder` (checkpoint,
  export or random init -> a model to evaluate).

Nothing here imports a method.
"""
from ssl_kit.encoders.factory import (
    ENCODER_INITS,
    FUSED_ATTENTION_MIN_TOKENS_CPU,
    PRESETS,
    EncoderConfigError,
    EncoderSpec,
    build_encoder,
    build_random_encoder,
    init_vit_mae_style,
    init_weights_mae,
    resolve_encoder_spec,
    select_attention_kernel,
    set_sincos_pos_embed,
    sincos_1d,
    sincos_2d_pos_embed,
)
from ssl_kit.encoders.tokens import (
    RandomMask,
    Windows,
    block_mask,
    gather_tokens,
    patchify,
    random_count_mask,
    random_masking,
    random_subset_mask,
    sample_windows,
    unpatchify,
)
from ssl_kit.encoders.rpe import DEFAULT_RATIO, IRPE_MODEL, VisionTransformerIRPE, irpe_spec  # registers the iRPE ViT
from ssl_kit.encoders.io import (
    CHECKPOINT_KEY,
    CONFIG,
    SAME,
    WEIGHTS,
    EncoderSource,
    encoder_record,
    export_encoder,
    load_encoder,
    load_exported_encoder,
    read_checkpoint,
    read_export,
    read_export_config,
    recorded_init,
)

__all__ = [
    "ENCODER_INITS", "FUSED_ATTENTION_MIN_TOKENS_CPU", "PRESETS", "EncoderConfigError", "EncoderSpec", "build_encoder",
    "build_random_encoder", "init_vit_mae_style", "init_weights_mae", "resolve_encoder_spec", "select_attention_kernel",
    "set_sincos_pos_embed", "sincos_1d", "sincos_2d_pos_embed",
    "RandomMask", "Windows", "block_mask", "gather_tokens", "patchify", "random_count_mask", "random_masking",
    "random_subset_mask", "sample_windows", "unpatchify",
    "DEFAULT_RATIO", "IRPE_MODEL", "VisionTransformerIRPE", "irpe_spec",
    "CHECKPOINT_KEY", "CONFIG", "SAME", "WEIGHTS", "EncoderSource", "encoder_record", "export_encoder", "load_encoder",
    "load_exported_encoder", "read_checkpoint", "read_export", "read_export_config", "recorded_init",
]
