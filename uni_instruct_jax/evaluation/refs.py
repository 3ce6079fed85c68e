"""Reference statistics checked before any sampling: the right kind of file, made the same way.

    detector = evaluate.load_detector(...)
    ref = refs.check_reference(config.eval.ref, detector, resolution=config.data.resolution or None)

`--mode=ref` records detector, resize_mode and resolution in the file (`meta_*` keys); EDM's
fid-refs record none, so only their feature dimension can be checked.
"""

from typing import Optional

from uni_instruct_jax import paths
from uni_instruct_jax.evaluation import evaluate
from uni_instruct_jax.evaluation import fid


def check_reference(path, detector: evaluate.Detector,
                    resolution: Optional[int] = None) -> fid.FeatureStatistics:
  """The statistics at `path` (config.eval.ref) if they fit `detector` at image side `resolution`.

  Raises fid.StatisticsError (one line naming config.eval.ref) when `path` is empty or not a file,
  is not a statistics .npz (mu [D], sigma [D, D]), has another feature dimension than the
  detector, or records another detector / resize mode / resolution. resolution None: not checked.
  """
  if not path or not paths.workdir_path(path).is_file():
    raise fid.StatisticsError(f"config.eval.ref {str(path)!r} is not a file (need a reference "
                              "statistics .npz: EDM's fid-refs, or one made with --mode=ref)")
  try:
    ref = fid.load_statistics(path)
    evaluate.check_reference(detector, ref, path, resolution)
  except fid.StatisticsError as e:
    raise fid.StatisticsError(f"config.eval.ref: {e}") from e
  return ref
