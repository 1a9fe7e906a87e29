"""DeiT-S/16 on an ImageNet-style class folder you provide, with the full DeiT recipe (accelerator-sized).

Needs data: ``data.path=/path/to/imagenet`` holding ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (1000 class
folders each); without it the run stops before anything is built. Nothing is downloaded.

The recipe is DeiT's (Touvron et al. 2021, Table 9, DeiT-S column; the timm flags of the DeiT repository):

    AdamW lr 5e-4 x batch / 512, weight decay 0.05, 5 warm-up epochs, cosine, 300 epochs, no gradient clipping
    label smoothing 0.1, stochastic depth 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25
    Mixup 0.8, CutMix 1.0 (switch probability 0.5), RandomResizedCrop (bicubic) + flip, model EMA 0.99996

Differences from the paper: no repeated augmentation (DeiT's 3 repeats per batch), no dropout (0 in DeiT too),
the crop is taken from the source's 224 centre crop of the image resized to 256 (DeiT crops the full image), and
the erasing noise is drawn in pixel space (see data/augment.py). Epochs are counted as 1251 steps of 1024 images.
Add ``model.reduction.r=13`` to train with ToMe.
"""

from configs._train_common import base, vit_block


def get_config():
    c = base()
    c.config_name = "deit_s_imagenet"
    c.model.vit = vit_block(variant="S/16", width=384, depth=12, mlp_dim=1536, heads=6, patch_size=16,
                            image_size=224, num_classes=1000, drop_path_rate=0.1)
    c.data.name = "image_folder"
    c.data.path = ""  # required
    c.data.image_size = 224
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.num_threads = 16
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)
    c.data.augment.crop_padding = 0
    c.data.augment.flip = True
    c.data.augment.random_resized_crop = True
    c.data.augment.rrc_scale = (0.08, 1.0)
    c.data.augment.rrc_ratio = (3 / 4, 4 / 3)
    c.data.augment.randaugment = "rand-m9-mstd0.5-inc1"
    c.data.augment.erase_prob = 0.25
    c.train.batch_size = 1024
    c.train.eval_batch_size = 1000
    c.train.steps = 300 * 1251
    c.train.eval_every = 5 * 1251
    c.train.log_every = 100
    c.train.compute_dtype = "bfloat16"
    c.train.label_smoothing = 0.1
    c.train.mixup_alpha = 0.8
    c.train.cutmix_alpha = 1.0
    c.train.mix_prob = 1.0
    c.train.mix_switch_prob = 0.5
    c.train.ema_decay = 0.99996
    c.optim.lr = 5e-4 * 1024 / 512
    c.optim.warmup_steps = 5 * 1251
    c.optim.weight_decay = 0.05
    c.optim.final_lr_ratio = 1e-5 / (5e-4 * 1024 / 512)   # DeiT's min_lr 1e-5
    c.optim.clip_norm = 0.0
    c.checkpoint.every = 2000
    c.mesh.fsdp = True
    return c
