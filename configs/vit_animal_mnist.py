"""CPU-sized ViT on Animal-MNIST (10k 28x28 silhouettes, seeded 80/20 split)."""

from configs._train_common import base, vit_block


def get_config():
    c = base()
    c.config_name = "vit_animal_mnist"
    c.model.vit = vit_block(width=128, depth=4, mlp_dim=256, heads=4, patch_size=4, image_size=28, num_classes=10)
    c.data.name = "animal_mnist"
    c.data.augment.crop_padding = 2
    c.data.augment.flip = True
    c.train.steps = 600            # ~19 epochs of 8k at batch 256
    c.train.eval_every = 200
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.train.label_smoothing = 0.1
    c.checkpoint.every = 200
    return c
