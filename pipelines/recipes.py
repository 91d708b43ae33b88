"""Training recipes as code: each is a function returning a :class:`JobConfig`.

- ``demo``: a small CIFAR-style ResNet on the synthetic shards; the embedded default.
- ``cifar-paper``: He et al. §4.2 — batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided
  by 10 at 32k and 48k iterations, stop at 64k; option-A shortcuts; ResNet-110 warms up at 0.01
  until the training error is below 80%.
- ``cifar-tutorial``: the widely copied CIFAR-10 tutorial recipe, for comparison with the paper's:
  150 epochs, batch 128, lr 0.1 then 0.01 for the last 50 epochs, weight decay 5e-4, random crop,
  scale, rotation and flip.
- ``imagenet-paper``: He et al. §3.4 — batch 256, lr 0.1 divided by 10 when the validation error
  plateaus, momentum 0.9, weight decay 1e-4, no dropout, scale augmentation [256, 480] + colour
  augmentation, per-pixel mean; up to 60e4 iterations (120 epochs).
- ``imagenet-fast``: a modern ResNet-50 recipe — v1.5 bottlenecks, zero-init residual BN,
  Inception crop, label smoothing 0.1, cosine schedule with 5 warm-up epochs, lr 0.1 per 256 images
  scaled linearly with the global batch (Goyal et al. 2017), bf16 on GPU, no decay on BN/bias.
- ``imagenet-tv2``: torchvision's ResNet-50 IMAGENET1K_V2 recipe (80.86% top-1), flag for flag;
  see :func:`imagenet_tv2` for the source and the differences.
- ``finetune``: torchvision's ResNet-50 IMAGENET1K_V2 weights fine-tuned on your own images
  (``resnet-prepare folder``): a new classifier, ImageNet normalisation, Inception crops at 224,
  evaluation at 224 after resizing to 232 (as the weights were evaluated), SGD lr 0.01 per 256
  images with a one-epoch warm-up and cosine decay, label smoothing 0.1, 15 epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pipelines.config import (
    DataConfig,
    JobConfig,
    ModelConfig,
    OptimConfig,
    ScaleConfig,
    ScheduleConfig,
    TrainConfig,
)

CIFAR_ITERATIONS = 64_000  # §4.2: "terminate training at 64k iterations"
# GPU speed (BENCHMARKS.md, "levers"): the step compiles on CUDA workers (train.compile=auto;
# CPU runs stay eager), SGD runs fused there (optim.implementation=auto, the default). ImageNet
# nets are GPU-bound at their batch: plain compile. CIFAR nets are launch-bound (hundreds of
# tiny kernels per step): CUDA graphs. train.compile=false switches it off.
IMAGENET_COMPILE = {"compile": "auto", "compile_mode": "default"}
CIFAR_COMPILE = {"compile": "auto", "compile_mode": "reduce-overhead"}


def _cifar_shortcut(model: str) -> str | None:
    """§4.2: option A (zero-padding identity) on the residual nets; plain nets have none."""
    return None if model.startswith("plain") else "A"


def demo(model: str = "resnet8") -> JobConfig:
    """About two CPU minutes on the synthetic CIFAR-like shards (5000 training images): about
    60% validation top-1 over 10 classes (chance: 10%). Batch 64 rather than the usual 128: on
    this budget more, smaller steps learn faster (same data and augmentation in a plain PyTorch
    loop, 6 epochs: 59% at batch 64, 51% at batch 128)."""
    return JobConfig(
        recipe="demo",
        model=ModelConfig(name=model),
        data=DataConfig(uri="data/synthetic-cifar", augment="cifar", image_size=32, eval_resize=32),
        optim=OptimConfig(lr=0.1, weight_decay=5e-4),
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=0.5),
        train=TrainConfig(global_batch=64, epochs=6, log_every_steps=20),
        scale=ScaleConfig(num_workers=2, cpus_per_worker=1.0, max_failures=3),
    )


def cifar_paper(model: str = "resnet20") -> JobConfig:
    """Paper §4.2 on CIFAR-10 (prepare with ``--val-size 5000`` for the 45k/5k split)."""
    hold = {"hold_lr": 0.01, "hold_until_train_error": 0.8} if model == "resnet110" else {}
    return JobConfig(
        recipe="cifar-paper",
        model=ModelConfig(name=model, shortcut=_cifar_shortcut(model)),
        data=DataConfig(uri="data/cifar10", augment="cifar", image_size=32, eval_resize=32),
        optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(kind="multistep", milestones=(32_000, 48_000), **hold),
        train=TrainConfig(
            global_batch=128, epochs=200, max_steps=CIFAR_ITERATIONS, **CIFAR_COMPILE
        ),
        scale=ScaleConfig(num_workers=1),
    )


def cifar_tutorial(model: str = "resnet20") -> JobConfig:
    """The popular tutorial recipe: 150 epochs, lr 0.1 → 0.01 at epoch 100, wd 5e-4."""
    return JobConfig(
        recipe="cifar-tutorial",
        model=ModelConfig(name=model, shortcut=_cifar_shortcut(model)),
        data=DataConfig(
            uri="data/cifar10",
            augment="cifar_tutorial",
            image_size=32,
            eval_resize=32,
            mean="per_channel",
            normalize_std=True,
        ),
        optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(kind="multistep", milestone_epochs=(100,)),
        train=TrainConfig(global_batch=128, epochs=150, **CIFAR_COMPILE),
        scale=ScaleConfig(num_workers=1),
    )


def imagenet_paper(model: str = "resnet50") -> JobConfig:
    """Paper §3.4; plain18/plain34 for the degradation study (Table 2)."""
    return JobConfig(
        recipe="imagenet-paper",
        model=ModelConfig(name=model, shortcut=None if model.startswith("plain") else "B"),
        data=DataConfig(
            uri="data/imagenet",
            augment="paper",
            image_size=224,
            eval_resize=256,
            mean="per_pixel",
            lighting_std=0.1,
            shuffle_buffer=0,  # shuffled before decoding instead (pipelines.data, Shuffling)
        ),
        optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(kind="plateau", plateau_patience=5),
        train=TrainConfig(
            global_batch=256,
            epochs=120,
            max_steps=600_000,
            log_every_steps=100,
            **IMAGENET_COMPILE,
        ),
        scale=ScaleConfig(num_workers=8, use_gpu=True, cpus_per_worker=2.0),
    )


def imagenet_fast(model: str = "resnet50") -> JobConfig:
    """Modern fast ResNet-50 (v1.5) recipe for GPU clusters."""
    return JobConfig(
        recipe="imagenet-fast",
        model=ModelConfig(name=model, stride_in_3x3=True, zero_init_residual=True),
        data=DataConfig(
            uri="data/imagenet",
            augment="inception",
            image_size=224,
            eval_resize=256,
            mean="imagenet",
            normalize_std=True,
            shuffle_buffer=0,  # shuffled before decoding instead (pipelines.data, Shuffling)
        ),
        optim=OptimConfig(
            lr=0.1,
            reference_batch=256,
            weight_decay=5e-5,
            decay_norm_and_bias=False,
            label_smoothing=0.1,
            nesterov=True,
        ),
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=5),
        train=TrainConfig(
            global_batch=1024, epochs=40, log_every_steps=100, precision="auto", **IMAGENET_COMPILE
        ),
        scale=ScaleConfig(num_workers=8, use_gpu=True, cpus_per_worker=2.0),
    )


def imagenet_tv2(model: str = "resnet50") -> JobConfig:
    """torchvision's recipe for ResNet50_Weights.IMAGENET1K_V2 (80.858% top-1 at 224 after
    resizing to 232), from the weights' documentation and the command published with them
    (pytorch/vision#3995, comment 1013906621; "How to Train State-Of-The-Art Models Using
    TorchVision's Latest Primitives", 2021)::

        torchrun --nproc_per_node=8 train.py --model resnet50 --batch-size 128 --lr 0.5
          --lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear
          --auto-augment ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002
          --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0
          --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4

    plus train.py's defaults for what the command leaves out: momentum 0.9, warm-up from 0.01
    of the rate, EMA every 32 steps at decay 0.99998, evaluation crop 224, bilinear resizing,
    fp32 (no --amp). Differences: the learning rate follows the cosine every step (torchvision
    steps its schedulers once an epoch); weight decay spares the classifier's bias as well as
    the norms (torchvision decays it: 1,000 of 25.6M weights); RandomErasing fills with the
    input mean on the uint8 crop, where torchvision fills 0 after normalising (the same colour);
    repeated augmentation keeps every epoch's rows (torchvision also trims each epoch to a
    multiple of 256 images); checkpoints keep the best by raw-weight validation top-1.
    ``train.precision=auto`` trains in bf16 for about twice the speed on Ampere and later.
    """
    return JobConfig(
        recipe="imagenet-tv2",
        model=ModelConfig(name=model, stride_in_3x3=True),
        data=DataConfig(
            uri="data/imagenet",
            augment="inception",
            image_size=176,
            eval_image_size=224,
            eval_resize=232,
            mean="imagenet",
            normalize_std=True,
            shuffle_buffer=0,  # shuffled before decoding instead (pipelines.data, Shuffling)
            mixup_alpha=0.2,
            cutmix_alpha=1.0,
            auto_augment="ta_wide",
            random_erase=0.1,
            repeated_augment=4,
        ),
        optim=OptimConfig(
            lr=0.5,
            reference_batch=1024,
            momentum=0.9,
            weight_decay=2e-5,
            decay_norm_and_bias=False,
            label_smoothing=0.1,
        ),
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=5, warmup_start_factor=0.01),
        train=TrainConfig(
            global_batch=1024,
            epochs=600,
            log_every_steps=100,
            precision="fp32",
            ema=True,
            ema_steps=32,
            ema_decay=0.99998,
            **IMAGENET_COMPILE,
        ),
        scale=ScaleConfig(num_workers=8, use_gpu=True, cpus_per_worker=2.0),
    )


FINETUNE_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    "resnet152": "ResNet152_Weights.IMAGENET1K_V2",
}


def finetune(model: str = "resnet50") -> JobConfig:
    """A pretrained torchvision ResNet on a folder of your own images; 1 worker, add ``--gpu``
    (and ``--workers``) where there are GPUs."""
    weights = FINETUNE_WEIGHTS.get(model)
    return JobConfig(
        recipe="finetune",
        model=ModelConfig(
            name=model,
            stride_in_3x3=True,  # torchvision's bottlenecks are v1.5
            init=f"torchvision:{weights}" if weights else None,
            reset_head=True,
        ),
        data=DataConfig(
            uri="data/my-images",
            augment="inception",
            image_size=224,
            eval_resize=232,
            mean="imagenet",  # the statistics the weights were trained with
            normalize_std=True,
        ),
        optim=OptimConfig(
            lr=0.01,
            reference_batch=256,
            weight_decay=1e-4,
            decay_norm_and_bias=False,
            label_smoothing=0.1,
        ),
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=1),
        # Eager: ResNet-50's compile (about a minute) costs more than it saves on a folder of a
        # few thousand images; train.compile=auto for large ones.
        train=TrainConfig(global_batch=64, epochs=15, log_every_steps=10),
        scale=ScaleConfig(num_workers=1, cpus_per_worker=2.0),
    )


RECIPES: dict[str, Callable[..., JobConfig]] = {
    "demo": demo,
    "cifar-paper": cifar_paper,
    "cifar-tutorial": cifar_tutorial,
    "imagenet-paper": imagenet_paper,
    "imagenet-fast": imagenet_fast,
    "imagenet-tv2": imagenet_tv2,
    "finetune": finetune,
}


def build_recipe(name: str, model: str | None = None) -> JobConfig:
    """The named recipe, optionally for another model of the family (its defaults kept)."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is unknown; use one of {sorted(RECIPES)}")
    config = RECIPES[name]() if model is None else RECIPES[name](model)
    return replace(config, recipe=name)
