"""CPU-sized ViT on Fashion-MNIST (28x28 grey, patch 4 -> 49 patches + class token).

    python train.py --config vit_fmnist                       # plain training
    python train.py --config vit_fmnist model.reduction.r=4   # ToMe in the loop (4 merges per layer)
"""

from configs._train_common import base, vit_block


def get_config():
    c = base()
    c.config_name = "vit_fmnist"
    c.model.vit = vit_block(width=128, depth=4, mlp_dim=256, heads=4, patch_size=4, image_size=28, num_classes=10)
    c.data.name = "fashion_mnist"
    c.data.augment.crop_padding = 2
    c.data.augment.flip = True
    c.train.steps = 940            # ~4 epochs of 60k at batch 256
    c.train.batch_size = 256
    c.train.eval_every = 470
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 60
    c.train.label_smoothing = 0.1
    c.checkpoint.every = 235
    return c
