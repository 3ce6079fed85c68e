"""Evaluation: FID InceptionV3, Fréchet distance, IS, KID, precision/recall, ResNet56 proxy.

Submodules: `inception` (the FID network), `fid` (statistics and metrics), `proxy` (ResNet56, not
FID) and `evaluate` (the API for the CLI and trainer: load_detector, compute_statistics,
evaluate, make_reference, write_eval_json). See docs/evaluation.md.
"""

from uni_instruct_jax.evaluation import evaluate, fid, inception, proxy
