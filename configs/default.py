"""Default configuration and its schema: every field of a Uni-Instruct distillation run.

Experiment configs load this file by path and override fields; every field is overridable on the
command line with --config.section.key=value, and `--mode=print_config` lists them all with the
descriptions below. Recipe defaults follow the official code (spec §3.3): batch 256, Adam
beta=(0, 0.999), eps 1e-8, lr 1e-5 for both networks, sigma_init 2.5, tmax 800, EMA half-life
0.5 Mimg with ramp 0.05, fake-score/discriminator warm-up 100 kimg, SiD-only until 200 kimg, then
the divergence + GAN.

SCHEMA documents each field exactly once: Field(default, one-line description, valid values),
read by `config_schema.validate` (run before any work) and by print_config. The default is only a
type (int, float, bool, str, tuple) when the value comes from elsewhere (data.get_data_config(),
augment.get_augment_config()) or only some configs set the field. `valid` is an interval
('[1, inf)', '(0, 1000]'; element-wise for tuples) or a tuple of choices. Adding a field is one
line here; tests/test_config.py checks that every field of every configs/*.py has an entry.
"""

import ml_collections

from uni_instruct_jax import augment
from uni_instruct_jax import config_schema
from uni_instruct_jax import data
from uni_instruct_jax import divergences

F = config_schema.Field
_METHODS = ("uni_instruct", "sid", "sida", "sid2a", "diff_instruct", "dmd", "dmd2", "f_distill",
            "sim")
_POS, _NONNEG, _COUNT, _PROB = "(0, inf)", "[0, inf)", "[1, inf)", "[0, 1]"

SCHEMA = {
    "seed": F(0, "base PRNG seed (initialisation, data order, noise draws)", "[0, 4294967295]"),

    # Device mesh: batch on 'data'; parameters sharded over 'model' when model_parallelism > 1.
    "mesh.model_parallelism": F(1, "devices per 'model' mesh axis (1: pure data parallelism)",
                                _COUNT),

    "training.total_kimg": F(300_000.0, "run length in thousands of real images seen (global)",
                             _POS),
    "training.batch_size": F(256, "global batch per update", _COUNT),
    "training.micro_batch_size": F(0, "micro-batch for gradient accumulation (0: none)", _NONNEG),
    "training.tick_kimg": F(10.0, "kimg per tick: status line, metrics and TensorBoard", _POS),
    "training.snapshot_ticks": F(50, "EMA sample grid every N ticks", _COUNT),
    "training.sigma_init": F(2.5, "generator input noise level: x_g = G(sigma_init z, sigma_init)",
                             _POS),

    # Values from data.get_data_config() (see uni_instruct_jax/data.py's docstring).
    "data.source": F(str, "image source ('toy': the toy mixture of configs/toy2d.py)",
                     ("folder", "edm_zip", "tfds", "toy", "image_mixture")),
    "data.path": F(str, "directory or .zip of images for 'folder' / 'edm_zip'"),
    "data.tfds_name": F(str, "tfds dataset name for 'tfds' (e.g. 'imagenet2012')"),
    "data.split": F(str, "tfds split"),
    "data.tfds_data_dir": F(str, "tfds data_dir ('' = the tfds default)"),
    "data.tfds_download": F(bool, "whether tfds may download and prepare the dataset"),
    "data.resolution": F(int, "target image side in pixels (0: native)", _NONNEG),
    "data.resize": F(bool, "allow resampling a source of another resolution to `resolution`"),
    "data.imagenet_preprocess": F(bool, "EDM's centre crop + Lanczos to `resolution`"),
    "data.use_labels": F(bool, "one-hot class labels (label_dim 0 when False)"),
    "data.max_size": F(int, "EDM-style random subset of this many images (0: all)", _NONNEG),
    "data.shuffle": F(bool, "shuffle every epoch (a pure function of seed and epoch)"),
    "data.prefetch": F(int, "batches decoded ahead on a background thread (0: in next())",
                       _NONNEG),
    "data.num_threads": F(int, "threads per process decoding batches (0: decode in next())",
                          _NONNEG),
    "data.worker_count": F(int, "grain worker processes decoding batches (0: this process only)",
                           _NONNEG),
    "data.num_modes": F(int, "toy data: Gaussians on the ring (or image-mixture means)", _COUNT),
    "data.mixture_std": F(float, "image mixture: per-pixel std of each component (data units)",
                          _POS),

    "teacher.source": F("pkl", "teacher: EDM .pkl, converted dir, random init of `network`, or the "
                        "toy's closed form", ("pkl", "converted", "random", "toy", "image_mixture")),
    "teacher.path": F("", "EDM .pkl or directory from `python -m uni_instruct_jax.convert`"),
    "teacher.fit_steps": F(int, "toy: Adam steps fitting the MLP denoiser to the exact teacher",
                           _COUNT),
    "teacher.fit_batch": F(int, "toy: batch of that fit", _COUNT),
    "teacher.fit_lr": F(float, "toy: learning rate of that fit", _POS),

    # Architecture of 'random' teachers (EDM constructor kwargs) and the compute dtype of all nets.
    "network.class_name": F("EDMPrecond", "preconditioner class",
                            ("EDMPrecond", "VPPrecond", "VEPrecond", "MLPPrecond")),
    "network.dtype": F("float32", "compute dtype (params stay float32)", ("float32", "bfloat16")),
    "network.attn_implementation": F("", "jax.nn.dot_product_attention implementation ('': XLA)",
                                     ("", "xla", "cudnn")),
    "network.remat": F("", "UNet block rematerialisation: '' off, 'block' recompute each block in "
                       "the backward pass, 'block_save_convs' keep its conv outputs "
                       "(docs/performance.md)", ("", "block", "block_save_convs")),
    "network.kwargs.img_resolution": F(32, "image side in pixels", "[1, 4096]"),
    "network.kwargs.img_channels": F(3, "image channels", "[1, 64]"),
    "network.kwargs.label_dim": F(0, "number of classes (0: unconditional)", "[0, 100000]"),
    "network.kwargs.model_type": F("SongUNet", "UNet architecture", ("SongUNet", "DhariwalUNet")),
    "network.kwargs.model_channels": F(128, "base channel count", "[1, 4096]"),
    "network.kwargs.channel_mult": F((2, 2, 2), "channel multiplier per resolution level",
                                     "[1, 64]"),
    "network.kwargs.num_blocks": F(4, "residual blocks per resolution level", "[1, 64]"),
    "network.kwargs.attn_resolutions": F((16,), "resolutions with self-attention", "[1, 4096]"),
    "network.kwargs.dropout": F(0.13, "dropout probability of the residual blocks", "[0, 1)"),
    "network.kwargs.augment_dim": F(9, "augmentation label width (0: no augment conditioning)",
                                    "[0, 64]"),
    "network.kwargs.embedding_type": F("positional", "SongUNet noise embedding",
                                       ("positional", "fourier")),
    "network.kwargs.encoder_type": F("standard", "SongUNet encoder",
                                     ("standard", "skip", "residual")),
    "network.kwargs.decoder_type": F("standard", "SongUNet decoder", ("standard", "skip")),
    "network.kwargs.channel_mult_noise": F(1, "SongUNet noise-embedding channel multiplier",
                                           "[1, 64]"),
    "network.kwargs.resample_filter": F((1, 1), "SongUNet resampling filter taps", "[0, inf)"),
    "network.kwargs.channel_mult_emb": F(int, "embedding channel multiplier", "[1, 64]"),
    "network.kwargs.label_dropout": F(float, "class-label dropout probability", "[0, 1)"),
    "network.kwargs.use_fp16": F(bool, "EDM's fp16 flag (ignored: see network.dtype)"),
    "network.kwargs.sigma_min": F(float, "EDMPrecond/VEPrecond lowest noise level", _NONNEG),
    "network.kwargs.sigma_max": F(float, "EDMPrecond/VEPrecond highest noise level", "(0, inf]"),
    "network.kwargs.sigma_data": F(float, "EDMPrecond/MLPPrecond data standard deviation", _POS),
    "network.kwargs.beta_d": F(float, "VPPrecond beta_d", _POS),
    "network.kwargs.beta_min": F(float, "VPPrecond beta_min", _NONNEG),
    "network.kwargs.M": F(int, "VPPrecond number of discretisation steps", _COUNT),
    "network.kwargs.epsilon_t": F(float, "VPPrecond smallest t", "(0, 1)"),
    "network.kwargs.dim": F(int, "MLPPrecond data dimension", _COUNT),
    "network.kwargs.hidden": F(tuple, "MLPPrecond hidden layer widths", "[1, 65536]"),
    "network.kwargs.emb_channels": F(int, "MLPPrecond noise-embedding width", _COUNT),

    "generator.init": F("teacher", "generator init: the teacher's weights, SiD-init, or (with "
                        "generator.network) from scratch or from generator.init_path",
                        ("teacher", "sid", "scratch", "checkpoint")),
    "generator.network": F("", "generator architecture: '' = the teacher's, or a registered "
                           "(z, labels) -> x module (networks/generators.py)", ("", "mlp", "dcgan")),
    "generator.sid_path": F("", "distilled EDM-format checkpoint for init 'sid'"),
    "generator.init_path": F("", "init 'checkpoint': a local training workdir (its latest EMA "
                             "generator) or a flax msgpack file of the generator.network params"),

    # Fake score network (+ discriminator = its encoder); augmentation applies to its inputs.
    # Values from augment.get_augment_config(): EDM's AugmentPipe, probabilities multiplier * p.
    "fake_score.augment.enabled": F(bool, "augment the fake-score/discriminator inputs"),
    "fake_score.augment.p": F(float, "overall augmentation probability", _PROB),
    "fake_score.augment.xflip": F(float, "x-flip multiplier", _NONNEG),
    "fake_score.augment.yflip": F(float, "y-flip multiplier", _NONNEG),
    "fake_score.augment.rotate_int": F(float, "90-degree rotation multiplier", _NONNEG),
    "fake_score.augment.translate_int": F(float, "integer translation multiplier", _NONNEG),
    "fake_score.augment.translate_int_max": F(float, "integer translation range (image fraction)",
                                              _NONNEG),
    "fake_score.augment.scale": F(float, "isotropic scaling multiplier", _NONNEG),
    "fake_score.augment.rotate_frac": F(float, "arbitrary rotation multiplier", _NONNEG),
    "fake_score.augment.aniso": F(float, "anisotropic scaling multiplier", _NONNEG),
    "fake_score.augment.translate_frac": F(float, "fractional translation multiplier", _NONNEG),
    "fake_score.augment.scale_std": F(float, "log2 std of isotropic scaling", _NONNEG),
    "fake_score.augment.rotate_frac_max": F(float, "rotation range (x pi)", _NONNEG),
    "fake_score.augment.aniso_std": F(float, "log2 std of anisotropic scaling", _NONNEG),
    "fake_score.augment.aniso_rotate_prob": F(float, "probability of rotating the aniso axis",
                                              _PROB),
    "fake_score.augment.translate_frac_std": F(float, "std of fractional translation", _NONNEG),
    "fake_score.augment.brightness": F(float, "brightness multiplier", _NONNEG),
    "fake_score.augment.contrast": F(float, "contrast multiplier", _NONNEG),
    "fake_score.augment.lumaflip": F(float, "luma flip multiplier", _NONNEG),
    "fake_score.augment.hue": F(float, "hue rotation multiplier", _NONNEG),
    "fake_score.augment.saturation": F(float, "saturation multiplier", _NONNEG),
    "fake_score.augment.brightness_std": F(float, "std of brightness change", _NONNEG),
    "fake_score.augment.contrast_std": F(float, "log2 std of contrast change", _NONNEG),
    "fake_score.augment.hue_max": F(float, "hue rotation range (x pi)", _NONNEG),
    "fake_score.augment.saturation_std": F(float, "log2 std of saturation change", _NONNEG),

    "loss.method": F("uni_instruct", "distillation method", _METHODS),
    "loss.divergence": F("jeffreys", "f-divergence (uni_instruct, f_distill)",
                         tuple(divergences.names())),
    "loss.schedule": F("", "divergence by images seen, 'KIMG:NAME,KIMG:NAME' ('': `divergence`)"),
    "loss.mode": F("official", "'official' (released code's loss) or 'exact' (spec §1.4)",
                   ("official", "exact")),
    "loss.warmup_kimg": F(100.0, "generator frozen (fake score + discriminator only) until here",
                          _NONNEG),
    "loss.sid_kimg": F(200.0, "SiD-only generator loss (no GAN) until here", _NONNEG),
    "loss.tmax": F(800, "generator noise t ~ U[0, tmax/1000] on EDM's Karras schedule",
                   "(0, 1000]"),
    "loss.disc_sigma_law": F("", "discriminator noise law: '' = by loss.mode ('fake' if official, "
                             "'mixture' if exact), 'fake' ln sigma ~ N(-1.2, 1.2^2), 'generator' "
                             "the generator's Karras sigma, 'mixture' half each",
                             ("", "fake", "generator", "mixture")),
    "loss.scale": F(100.0, "generator loss scaling (the recipe's lsg) of the batch mean", _POS),
    # Extra losses.method_options(...) overrides (empty by default).
    "loss.overrides.ratio_source": F(str, "density ratio from the discriminator: exp(logit), or "
                                     "the released code's BCE-derived value",
                                     ("logit", "official_bce")),
    "loss.overrides.ratio_clip": F(tuple, "(lo, hi) clip of the density ratio r", _POS),
    "loss.overrides.alpha": F(float, "SiD coefficient of 'official' mode", _NONNEG),
    "loss.overrides.normalize": F(bool, "divide the 'exact' / 'di' loss by w_f"),
    "loss.overrides.normalize_h": F(bool, "'di' mode: divide h(r) by its batch mean"),
    "loss.overrides.gan_weight": F(float, "weight of the generator GAN term", _NONNEG),
    "loss.overrides.weight": F(float, "weight of the divergence term", _NONNEG),
    "loss.overrides.normalizer": F(str, "normaliser of 'exact' / 'sim': per-sample w_f, or "
                                   "losses.sigma_normalizer (keeps the gradient exact)",
                                   ("w_f", "sigma")),
    "loss.overrides.gan_normalize": F(bool, "divide the GAN term by w_f (default: by mode)"),
    "loss.overrides.sim_distance": F(str, "SIM distance", ("pseudo_huber", "squared_l2")),
    "loss.overrides.sim_c": F(float, "SIM pseudo-Huber c", _POS),

    "optim.lr": F(1e-5, "fake-score (and discriminator) Adam learning rate", _POS),
    "optim.gen_lr": F(1e-5, "generator Adam learning rate", _POS),
    "optim.b1": F(0.0, "Adam beta1", "[0, 1)"),
    "optim.b2": F(0.999, "Adam beta2", "[0, 1)"),
    "optim.eps": F(1e-8, "Adam epsilon", _POS),
    "optim.fake_grad_clip": F(1.0, "value clip of fake-score gradients with the GAN on (0: off)",
                              _NONNEG),

    "ema.halflife_kimg": F(500.0, "EMA half-life of the generator in kimg", _POS),
    "ema.rampup_ratio": F(0.05, "half-life at most this fraction of images seen (0: no ramp)",
                          _NONNEG),

    "ckpt.every_ticks": F(5, "checkpoint every N ticks (and at the end)", _COUNT),
    "ckpt.keep": F(3, "latest checkpoints kept", _COUNT),

    "eval.every_ticks": F(0, "FID of the EMA generator every N ticks (0: never while training)",
                          _NONNEG),
    "eval.num_samples": F(50_000, "generated images per evaluation (FID-50k)", _COUNT),
    "eval.seed": F(0, "evaluation batch i draws its latents/labels from fold_in(seed, i)",
                   "[0, 4294967295]"),
    "eval.batch_size": F(250, "images per detector batch", _COUNT),
    "eval.ref": F("", "reference statistics .npz (mu, sigma): EDM's fid-refs or --mode=ref's"),
    "eval.detector": F("inception", "'inception' (FID) or 'proxy' (CIFAR-10 ResNet56; NOT FID)",
                       ("inception", "proxy")),
    "eval.detector_path": F("", "pt_inception-2015-12-05-6726825d.pth, or the ResNet56 .th"),
    "eval.resize_mode": F("tf", "Inception resize: 'tf' (EDM/StyleGAN numbers) or pytorch-fid's",
                          ("tf", "pytorch-fid")),
    "eval.teacher_steps": F(0, "--mode=eval on the teacher's Heun sampler with N steps (0: off)",
                            _NONNEG),
    "eval.images": F("", "--mode=eval / ref on an image folder or zip instead"),

    "sample.grid": F(8, "snapshot grid side (grid x grid images)", _COUNT),
    "sample.num_samples": F(64, "images written by --mode=sample", _COUNT),
    "sample.seed": F(0, "sampling seed", "[0, 4294967295]"),
    "sample.batch_size": F(256, "images per sampling batch", _COUNT),
    "sample.outdir": F("", "--mode=sample: write num_samples PNGs (one per seed from `seed`) in "
                       "EDM generate.py's layout here, for EDM's fid.py ('': grid + .npz in W)"),
}


def _feature_dim(detector: str) -> int:
  from uni_instruct_jax.evaluation import inception, proxy  # pylint: disable=g-import-not-at-top
  return {"inception": inception.FEATURE_DIM, "proxy": proxy.FEATURE_DIM}[detector]


R = config_schema.Rule
RULES = (
    R("training.micro_batch_size",
      lambda c: c.training.micro_batch_size == 0 or (
          c.training.micro_batch_size <= c.training.batch_size
          and c.training.batch_size % c.training.micro_batch_size == 0),
      "0 or a divisor of training.batch_size"),
    R("loss.overrides.ratio_clip",
      lambda c: len(c.loss.overrides.ratio_clip) == 2 and (
          c.loss.overrides.ratio_clip[0] < c.loss.overrides.ratio_clip[1]),
      "a pair (lo, hi) with 0 < lo < hi"),
    R("eval.num_samples", lambda c: c.eval.num_samples > _feature_dim(c.eval.detector),
      "more than the detector's feature dimension (inception 2048, proxy 64): the covariance "
      "must be full-rank"),
)


def get_config() -> ml_collections.ConfigDict:
  """All sections with the CIFAR-10 recipe's values; the data and teacher paths are empty."""
  c = config_schema.defaults(SCHEMA)
  c.data = data.get_data_config()
  c.fake_score.augment = augment.get_augment_config()
  return c
