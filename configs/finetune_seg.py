"""Segmentation fine-tuning configurations (Swin U-Net from exported VIS-MAE weights).

Run one with:

  python -m vismae_jax.finetune --config=configs/finetune_seg.py:VARIANT --workdir=DIR

VARIANT is `default`, `demo` or `test`, optionally followed by overrides, for example
`--config=configs/finetune_seg.py:default,data.csv=/data/seg.csv` or, to compare random and
pretrained initialisations,
`--config=configs/finetune_seg.py:demo,initialisations="('random','/tmp/vismae_demo/export/vismae_mae.pth')"`.
Unknown keys are errors.

`default` is the recipe of the public VIS-MAE fine-tuning code: 320x320 inputs, batch 32, 150
epochs with 40 warmup epochs, AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.05, cosine decay;
loss 0.4 x cross-entropy + 0.6 x soft Dice. The public code uses encoder depths (2, 2, 6, 2),
which leaves 8 blocks without pretrained weights; the default (2, 2, 2, 2) initialises every
block from the MAE (set model.depths=(2,2,6,2) for the public layout).

`demo` fine-tunes the full-size model on the 27 lesion slices of the pyradiomics demo volumes
(downloaded with pip on first use) at 96x96 for 3 epochs, on 2 of 5 cross-validation splits and
2 label fractions.
"""

import ml_collections

from vismae_jax import config_args

VARIANTS = ("default", "demo", "test")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Return the segmentation fine-tuning config for `arg` ("variant[,key=value,...]")."""
    variant, overrides = config_args.split_arg(arg, VARIANTS, default="default")

    config = ml_collections.ConfigDict()
    config.variant = variant  # Name of the variant this config was built from.
    config.task = "segmentation"  # Downstream task; fixed for this file.
    # Seed for folds, label subsets, random initialisation, shuffling, augmentation.
    config.seed = 0
    # Where the weights come from: "random", a .pth/.safetensors path, or "NAME=PATH". Each
    # entry is a separate run over every split and label fraction.
    config.initialisations = ("random",)

    config.data = ml_collections.ConfigDict()
    config.data.csv = ""  # CSV with columns image, mask and optionally patient, fold, slice.
    config.data.demo = False  # Use the pyradiomics demo volumes instead of data.csv.
    config.data.demo_cache_dir = ""  # Cache folder for the demo volumes; "" = ~/.cache/vismae_jax.
    config.data.image_size = 320  # Side of the square model input in pixels; a multiple of 32.
    config.data.channels = 0  # Model input channels (1 or 3); 0 = as exported, 1 for random init.
    config.data.pixel_mean = 0.223  # Normalisation mean of pixels in [0, 1] (pretraining value).
    config.data.pixel_std = 0.202  # Normalisation standard deviation (pretraining value).
    # Volume (center, width) in stored units; width 0 = percentiles.
    config.data.window = (0.0, 0.0)
    # Volume percentile range mapped to [0, 1] without window.
    config.data.percentiles = (0.5, 99.5)
    config.data.slice_axis = 2  # Volume array axis (file index order) that slices are taken along.
    config.data.empty_slice_margin = -1  # Keep volume slices within N of foreground; -1 = all.
    config.data.num_workers = 4  # DataLoader worker processes (0 = in the main process).

    config.augment = ml_collections.ConfigDict()
    # Probability of each of a horizontal and a vertical flip.
    config.augment.flip_probability = 0.5
    config.augment.rotate90 = True  # Rotate by a random multiple of 90 degrees.
    config.augment.max_rotation_degrees = 10.0  # Small affine: rotation range in degrees.
    config.augment.max_scale_change = 0.1  # Small affine: scale drawn from [1 - s, 1 + s].
    config.augment.max_translation = 0.05  # Small affine: shift range as a fraction of the side.

    config.model = ml_collections.ConfigDict()
    config.model.patch_size = 4  # Pixels per token side; must match the pretrained weights.
    config.model.embed_dim = 96  # Token width of encoder stage 0; must match the weights.
    config.model.depths = (2, 2, 2, 2)  # Swin blocks per encoder stage (public code: (2,2,6,2)).
    config.model.num_heads = (3, 6, 12, 24)  # Attention heads per encoder stage.
    config.model.window_size = 7  # Attention window side in tokens.
    config.model.mlp_ratio = 4.0  # MLP hidden width / token width.
    config.model.drop_path_rate = 0.1  # Stochastic depth, spread linearly over the encoder blocks.

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32  # Images per optimiser step.
    config.train.eval_batch_size = 32  # Images per batch on the validation and test sets.
    config.train.num_epochs = 150  # Passes over the training subset.
    config.train.warmup_epochs = 40.0  # Linear learning-rate warmup, in epochs.
    config.train.learning_rate = 1e-3  # Peak learning rate; cosine decay to 0 after warmup.
    config.train.b1 = 0.9  # AdamW first-moment decay.
    config.train.b2 = 0.95  # AdamW second-moment decay.
    config.train.weight_decay = 0.05  # AdamW decoupled weight decay (not on norms, biases, tables).
    # auto (bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16.
    config.train.precision = "auto"
    # Validation metric that picks the best epoch (or "loss").
    config.train.selection_metric = "dice"
    config.train.device = "auto"  # auto (CUDA if available), cpu, cuda or cuda:N.
    config.train.num_threads = 0  # PyTorch CPU threads; 0 keeps PyTorch's default (all cores).

    config.protocol = ml_collections.ConfigDict()
    config.protocol.num_folds = 5  # Cross-validation folds for data sets under 4,000 images.
    config.protocol.label_fractions = (0.05, 0.1, 0.25, 0.5, 0.8, 1.0)  # Training-label fractions.
    config.protocol.splits_to_run = ()  # Indices of the splits to run; () runs all of them.

    config.report = ml_collections.ConfigDict()
    config.report.num_overlays = 4  # Test images per overlay PNG (largest lesions first).

    if variant == "demo":
        apply_demo(config)
    elif variant == "test":
        apply_test(config)

    config_args.apply_overrides(config, overrides)
    return config


def apply_demo(config: ml_collections.ConfigDict) -> None:
    """Full-size model on the pyradiomics demo volumes: a few minutes on 2 CPU cores.

    Command:
      python -m vismae_jax.finetune --config=configs/finetune_seg.py:demo \
        --workdir=/tmp/seg_demo
    Expected: results.csv, label_efficiency_{dice,precision,recall}.png and overlays/ in the
    workdir. Three epochs on about 16 training slices are far from converged: the numbers show
    that the pipeline runs, not what the model can reach.
    """
    config.data.demo = True
    config.data.image_size = 96
    config.data.empty_slice_margin = 0
    config.data.num_workers = 0
    config.train.batch_size = 8
    config.train.eval_batch_size = 16
    config.train.num_epochs = 3
    config.train.warmup_epochs = 1.0
    config.protocol.label_fractions = (0.25, 1.0)
    config.protocol.splits_to_run = (0, 1)


def apply_test(config: ml_collections.ConfigDict) -> None:
    """Tiny model for tests: seconds on CPU."""
    config.data.demo = True
    config.data.image_size = 64
    config.data.empty_slice_margin = 0
    config.data.num_workers = 0
    config.model.embed_dim = 16
    config.model.num_heads = (1, 1, 2, 2)
    config.model.drop_path_rate = 0.0
    config.train.batch_size = 4
    config.train.eval_batch_size = 8
    config.train.num_epochs = 2
    config.train.num_threads = 1
    config.train.warmup_epochs = 1.0
    config.protocol.label_fractions = (0.5, 1.0)
    config.protocol.splits_to_run = (0,)
    config.report.num_overlays = 2
