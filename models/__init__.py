"""tokenreduce.models: Flax NNX models that call ``reduction`` reducers inside their blocks."""

from models.vit import ViT, ViTConfig, make_forward, parse_variant, vit_config

__all__ = ["ViT", "ViTConfig", "make_forward", "parse_variant", "vit_config"]
