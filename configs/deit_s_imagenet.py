"""DeiT-S/16 on an ImageNet-style class folder (accelerator-sized): data.path=/data/imagenet with
train/ and val/ sub-folders of class folders. DeiT recipe: AdamW lr 5e-4 x batch/512, wd 0.05, 5 warm-up
epochs, label smoothing 0.1, 300 epochs (here in steps); add model.reduction.r=13 for ToMe training."""

from configs._train_common import base, vit_block


def get_config():
    c = base()
    c.config_name = "deit_s_imagenet"
    c.model.vit = vit_block(variant="S/16", width=384, depth=12, mlp_dim=1536, heads=6, patch_size=16,
                            image_size=224, num_classes=1000)
    c.data.name = "image_folder"
    c.data.path = ""  # required
    c.data.image_size = 224
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.num_threads = 16
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)
    c.data.augment.crop_padding = 16
    c.data.augment.flip = True
    c.train.batch_size = 1024
    c.train.eval_batch_size = 1000
    c.train.steps = 300 * 1251
    c.train.eval_every = 5 * 1251
    c.train.log_every = 100
    c.train.compute_dtype = "bfloat16"
    c.train.label_smoothing = 0.1
    c.optim.lr = 5e-4 * 1024 / 512
    c.optim.warmup_steps = 5 * 1251
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 0.0
    c.checkpoint.every = 2000
    c.mesh.fsdp = True
    return c
