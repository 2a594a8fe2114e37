"""Pretraining configurations for the VIS-MAE Swin masked autoencoder.

Run one with:

  python -m vismae_jax.pretrain --config=configs/pretrain.py:VARIANT --workdir=DIR

VARIANT is one of `generic`, `mr`, `ct`, `pet`, `xray`, `us`, `demo` or `test`, optionally
followed by overrides: `--config=configs/pretrain.py:demo,train.num_steps=20`. Single fields
can also be overridden with flags: `--config.train.learning_rate=1e-3`. Unknown keys are errors.

The recipe of the VIS-MAE paper (Liu et al., MLMI 2024), used by generic and the modality
variants: global batch 5120, 800 epochs, 10 warmup epochs, AdamW betas (0.9, 0.95), weight
decay 0.05, cosine decay to 0, learning rate 1e-4 as the paper states. The public PyTorch code
runs 1e-3.
"""

import ml_collections

from vismae_jax import config_args

VARIANTS = ("generic", "mr", "ct", "pet", "xray", "us", "demo", "test")


def model_config() -> ml_collections.ConfigDict:
    """Return the full-size Swin MAE architecture (the public code's `swin_mae()`)."""
    model = ml_collections.ConfigDict()
    model.image_size = 224  # Square input side in pixels; a multiple of the mask unit.
    model.patch_size = 4  # Pixels per token side (patch-embedding convolution stride).
    model.channels = 1  # Input channels: 1 for grayscale medical images, 3 for colour.
    model.embed_dim = 96  # Token width of encoder stage 0; doubles at each merge.
    model.depths = (2, 2, 2, 2)  # Swin blocks per encoder stage; the decoder mirrors stages 2..0.
    model.num_heads = (3, 6, 12, 24)  # Attention heads per encoder stage.
    model.window_size = 7  # Attention window side in tokens.
    model.mlp_ratio = 4.0  # MLP hidden width / token width.
    model.drop_path_rate = 0.1  # Stochastic depth, spread linearly over the encoder blocks.
    model.mask_unit = 16  # Side in pixels of a masking unit (4x4 tokens at patch 4).
    model.mask_ratio = 0.75  # Fraction of mask units replaced by the mask token.
    model.norm_pix_loss = False  # Normalise each target patch by its own mean and variance.
    model.dtype = "bfloat16"  # Compute dtype of activations and matmuls.
    model.param_dtype = "float32"  # Storage dtype of parameters.
    model.remat = False  # Recompute block activations in the backward pass to save memory.
    return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Return the pretraining config for `arg` ("variant" or "variant,key=value,...")."""
    variant, overrides = config_args.split_arg(arg, VARIANTS, default="generic")

    config = ml_collections.ConfigDict()
    config.variant = variant  # Name of the variant this config was built from.
    config.seed = 0  # Seed for parameter initialisation, masks, flips and data order.
    config.model = model_config()

    config.data = ml_collections.ConfigDict()
    config.data.corpus_dir = ""  # Prepared corpus (ArrayRecord shards); "" = WORKDIR/corpus.
    config.data.modality = "all"  # Modality filter: all, mr, ct, pet, xray or us.
    config.data.num_workers = 8  # Grain worker processes per JAX process (0 = in-process).
    config.data.prefetch_buffer_size = 4  # Batches each Grain worker prepares ahead.
    config.data.pixel_mean = 0.223  # Normalisation mean of pixels in [0, 1].
    config.data.pixel_std = 0.202  # Normalisation standard deviation of pixels in [0, 1].
    config.data.flip_probability = 0.5  # Probability of a random horizontal flip per image.

    config.train = ml_collections.ConfigDict()
    config.train.global_batch_size = 5120  # Images per optimiser step over all devices.
    config.train.grad_accum_steps = 1  # Micro-batches per step, run in turn; one weighted update.
    config.train.num_epochs = 800.0  # Passes over the corpus; sets the schedule length.
    config.train.num_steps = -1  # If > 0, train exactly this many steps (overrides num_epochs).
    config.train.warmup_epochs = 10.0  # Linear learning-rate warmup, in epochs.
    config.train.learning_rate = 1e-4  # Peak learning rate (the public code uses 1e-3).
    config.train.b1 = 0.9  # AdamW first-moment decay.
    config.train.b2 = 0.95  # AdamW second-moment decay.
    config.train.weight_decay = 0.05  # AdamW decoupled weight decay (not on norms, biases, tables).
    config.train.grad_clip_norm = 0.0  # Clip gradients to this global norm; 0 turns clipping off.
    config.train.init_from = ""  # Workdir or step folder whose params start the run; "" = random.
    config.train.max_steps_per_run = -1  # Save and stop after N steps of this call; -1 = no limit.

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 50  # Fetch metrics, log a line and write TensorBoard every N steps.
    config.log.reconstruction_every_steps = 1000  # Write a reconstruction grid every N steps.
    config.log.checkpoint_every_steps = 1000  # Save a checkpoint every N steps.
    config.log.keep_checkpoints = 3  # Keep the newest N checkpoints ...
    config.log.keep_period = 10000  # ... and every checkpoint whose step is a multiple of this.

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # Data-parallel mesh axis size; -1 takes the remaining devices.
    config.mesh.fsdp = 1  # Parameter-sharding mesh axis size.
    # Ordered (regex, rule) pairs matched against state paths such as params/layers_0/.../kernel;
    # the first match wins. Rules: "replicate", or "fsdp" (split the largest dimension that the
    # fsdp axis divides). Unmatched leaves are replicated, so the default is pure data parallel.
    config.mesh.param_rules = ((".*", "replicate"),)  # Sharding rules, as described above.

    if variant in ("mr", "ct", "pet", "xray", "us"):
        config.data.modality = variant
    elif variant == "demo":
        apply_demo(config)
    elif variant == "test":
        apply_test(config)

    config_args.apply_overrides(config, overrides)
    return config


def apply_demo(config: ml_collections.ConfigDict) -> None:
    """Full architecture (26.6M parameters, 224x224) on the 59-image demo corpus, 60 steps.

    Command: launch/demo.sh /tmp/vismae_demo (prepares WORKDIR/corpus, trains, exports), or
    python -m vismae_jax.pretrain --config=configs/pretrain.py:demo --workdir=/tmp/vismae_demo
    once the corpus is in /tmp/vismae_demo/corpus.
    Expected: the masked-patch loss falls from about 2.4 at step 1 to about 0.7 (mean of steps
    51-60). On 2 CPU cores shared with other jobs the run took 20 minutes (2 minutes of
    compilation, then 0.4-0.5 images/s); an idle machine is faster.
    """
    config.data.num_workers = 0
    config.train.global_batch_size = 8
    config.train.num_steps = 60
    config.train.warmup_epochs = 1.0
    config.train.learning_rate = 3e-4
    config.train.grad_clip_norm = 1.0
    config.log.every_steps = 10
    config.log.reconstruction_every_steps = 30
    config.log.checkpoint_every_steps = 20


def apply_test(config: ml_collections.ConfigDict) -> None:
    """Tiny model (0.4M parameters, 64x64 images) for the tests on simulated CPU devices.

    Command: python -m vismae_jax.pretrain --config=configs/pretrain.py:test --workdir=/tmp/test
    (with a corpus prepared at --image_size=64 in /tmp/test/corpus). Expected: 6 steps,
    checkpoints at steps 3 and 6; compiling the step takes longer than running it.
    """
    model = config.model
    model.image_size = 64
    model.embed_dim = 16
    model.num_heads = (1, 1, 2, 2)
    model.depths = (1, 1, 1, 1)
    model.window_size = 8
    model.drop_path_rate = 0.0
    model.dtype = "float32"
    config.data.num_workers = 0
    config.train.global_batch_size = 8
    config.train.num_steps = 6
    config.train.warmup_epochs = 0.0
    config.train.learning_rate = 1e-3
    config.log.every_steps = 2
    config.log.reconstruction_every_steps = 3
    config.log.checkpoint_every_steps = 3
