"""uni_instruct_jax.compare: the grid's rows and configs, the fit cache, and the compare path end
to end on a tiny image mixture (K = 4 means of 2x2 pixels)."""

import json
import pathlib

import numpy as np
import pytest

from uni_instruct_jax import compare
from uni_instruct_jax import toy
from uni_instruct_jax import toy_run

ZIP = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train-jpeg.zip"


def test_grid_rows_match_the_issue():
  toy_rows = compare.grid_rows("toy2d")
  image_rows = compare.grid_rows("image_mixture")
  unet_rows = [r for r in image_rows if r.network == "songunet"]
  assert [(r.method, r.mode, r.divergence, r.seeds) for r in unet_rows] == [
      ("sid", "official", "reverse_kl", 1), ("uni_instruct", "exact", "forward_kl", 1)]
  mlp_rows = [r for r in image_rows if r.network == "mlp"]
  assert len(toy_rows) == len(mlp_rows) + 1  # the unclipped row
  assert sum(r.seeds for r in mlp_rows) == 4 * 3 + 10 + 3  # + w_f-normaliser and no-GAN rows
  wf = [r for r in toy_rows if r.normalizer]
  assert [(r.mode, r.divergence, r.normalizer, r.seeds) for r in wf] == [
      ("exact", "forward_kl", "w_f", 3)]
  no_gan = [(r.divergence, r.gan_weight, r.seeds) for r in toy_rows if r.gan_weight is not None]
  assert no_gan == [("reverse_kl", 0.0, 3), ("jeffreys", 0.0, 1)]
  multi = {(r.method, r.divergence) for r in mlp_rows if r.seeds == 3}
  assert multi == {("sid", "reverse_kl"), ("uni_instruct", "reverse_kl"),
                   ("uni_instruct", "forward_kl"), ("uni_instruct", "jeffreys")}
  exact = {r.divergence for r in mlp_rows if r.mode == "exact"}
  assert exact == set(compare.DIVERGENCES)
  for rows in (toy_rows, image_rows):
    ids = [compare.row_id(r, s) for r in rows for s in range(r.seeds)]
    assert len(ids) == len(set(ids))


def test_row_config_knobs_and_unclipped_row():
  base = compare.base_config("toy2d", steps=600, settings={"teacher.fit_steps": 7})
  assert base.teacher.fit_steps == 7
  assert base.training.total_kimg * 1000 / base.training.batch_size == pytest.approx(600)
  assert base.loss.sid_kimg / base.training.total_kimg == pytest.approx(0.1)
  rows = {r.name: r for r in compare.grid_rows("toy2d")}
  clipped = compare.row_config(base, rows["UI exact jeffreys"], 2)
  unclipped = compare.row_config(base, rows["UI exact jeffreys unclipped"], 0)
  assert clipped.seed == 2 and compare.effective_clip(clipped) == "[0.25, 4]"
  assert compare.effective_clip(unclipped) == "none"
  assert "ratio_clip" in base.loss.overrides  # the base is not modified
  sid = compare.row_config(base, rows["SiD (alpha 1.2)"], 0)
  assert (sid.loss.method, sid.loss.divergence) == ("sid", "reverse_kl")
  wf_row = rows["UI exact forward_kl w_f normaliser"]
  wf = compare.row_config(base, wf_row, 1)
  assert wf.loss.overrides.normalizer == "w_f" and base.loss.overrides.normalizer == "sigma"
  assert compare.row_id(wf_row, 1) == "uni_instruct-exact-forward_kl-wf-s1"
  cells = compare._knob_cells(wf_row, [], base)  # pylint: disable=protected-access
  assert cells[2] == "exact (n: w_f)"
  no_gan_row = rows["UI exact reverse_kl no GAN"]
  no_gan = compare.row_config(base, no_gan_row, 0)
  assert no_gan.loss.overrides.gan_weight == 0.0 and "gan_weight" not in base.loss.overrides
  assert compare.row_id(no_gan_row, 0) == "uni_instruct-exact-reverse_kl-nogan-s0"
  assert compare._knob_cells(no_gan_row, [], base)[2] == (  # pylint: disable=protected-access
      "exact (n: sigma), GAN weight 0")


def test_variant_findings_set_each_variant_row_beside_its_config_twin():
  rows = {r.name: r for r in compare.grid_rows("toy2d")}
  run = lambda metric, init: {"student_metric": metric, "init_metric": init}
  loaded = [(rows["SiD (alpha 1.2)"], [run(0.03, 0.4)], 0),
            (rows["UI exact forward_kl"], [run(0.05, 0.4), run(12.0, 0.4)], 0),
            (rows["UI exact forward_kl w_f normaliser"], [run(0.06, 0.4)], 0)]
  out = compare._variant_findings(  # pylint: disable=protected-access
      loaded, lambda r: r["student_metric"], lambda r: r["init_metric"], "W2")
  assert out == ["UI exact forward_kl w_f normaliser: W2 0.06 by seed (0/1 diverged); "
                 "UI exact forward_kl: W2 0.05, 12 by seed (1/2 diverged)."]
  assert not compare._variant_findings(  # pylint: disable=protected-access
      loaded[:2], lambda r: r["student_metric"], lambda r: r["init_metric"], "W2")


def test_behaviour_findings_group_image_rows_by_what_every_seed_does():
  rows = {r.name: r for r in compare.grid_rows("image_mixture")}
  def run(tv, precision, covered, fd):
    return {"student": {"mode_balance_tv": tv, "precision": precision, "modes_covered": covered,
                        "pixel_fd": fd}, "init": {"pixel_fd": 10.0}}
  loaded = [(rows["SiD (alpha 1.2)"], [run(0.1, 0.0, 0, 1.0), run(0.2, 0.01, 0, 2.0)], 0),
            (rows["DMD"], [run(0.9, 0.5, 3, 20.0)], 0),
            (rows["UI exact jensen_shannon"], [run(0.9, 0.0, 0, 1e5)], 0),
            (rows["SiDA"], [run(0.1, 0.0, 0, 0.5), run(0.9, 0.5, 2, 20.0)], 0),  # mixed seeds
            (rows["Diff-Instruct"], [], 0)]
  out = compare._behaviour_findings(  # pylint: disable=protected-access
      loaded, {"pixel_fd": 0.025, "mode_balance_tv": 0.02}, {"pixel_fd": 0.05}, 32)
  assert out[0].endswith("without reaching them (balance TV < 0.3 and precision < 0.1): "
                         "SiD (alpha 1.2).")
  assert out[1].endswith("collapsed onto at most 8/32 modes (balance TV > 0.5): DMD.")
  assert out[2].endswith("initial generator's): UI exact jensen_shannon.")
  assert out[3] == "Rows covering >= 95 % of the 32 modes in every seed: none."
  assert "lowest pixel FD (worst seed) is SiD (alpha 1.2)'s 2.000, 40.0x the teacher's" in out[4]


def test_bad_input_is_one_line_error():
  with pytest.raises(compare.CompareError, match="unknown config key"):
    compare.base_config("toy2d", settings={"loss.nope": 1})
  with pytest.raises(compare.CompareError, match="KEY=VALUE"):
    compare.parse_set(["novalue"])
  with pytest.raises(compare.CompareError, match="--grid"):
    compare.base_config("cifar")
  assert compare.parse_set(["a.b=(1, 2)", "c=x"]) == {"a.b": (1, 2), "c": "x"}


def test_stat_mean_and_sample_std():
  assert compare._stat([1.0, 2.0, 3.0], ".2f") == "2.00 ± 1.00"
  assert compare._stat([0.5], ".1f") == "0.5"
  assert compare._stat([], ".1f") == "–"


def test_fit_cache_reuses_the_stored_value(tmp_path, monkeypatch):
  monkeypatch.setenv(toy_run.FIT_CACHE_ENV, str(tmp_path))
  mixture = toy.GaussianMixture.ring(num_modes=4)
  calls = []

  def compute():
    calls.append(1)
    return {"w": np.arange(3.0)}
  template = {"w": np.zeros(3)}
  first = toy_run.cached_on_disk("fit", mixture, {"steps": 3}, compute, template)
  second = toy_run.cached_on_disk("fit", mixture, {"steps": 3}, compute, template)
  other = toy_run.cached_on_disk("fit", mixture, {"steps": 4}, compute, template)
  assert len(calls) == 2  # the second call read the cache; other settings -> another entry
  np.testing.assert_array_equal(second["w"], first["w"])
  np.testing.assert_array_equal(other["w"], np.arange(3.0))


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_image_mixture(tmp_path, monkeypatch):
  if not ZIP.is_file():
    pytest.skip(f"{ZIP} absent")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  out, doc, figures = tmp_path / "runs", tmp_path / "results.md", tmp_path / "fig"
  argv = [f"--out={out}", "--grid=image_mixture", "--steps=20", "--max-seeds=1",
          "--rows=SiD (alpha 1.2),UI exact forward_kl", f"--doc={doc}", f"--figures={figures}",
          "--set=data.num_modes=4", "--set=data.resolution=2", "--set=teacher.fit_steps=20",
          "--set=network.kwargs.hidden=(32, 32)", "--set=training.batch_size=32"]
  assert compare.main(argv) == 0
  text = doc.read_text()
  assert "exact samples (floor)" in text and "TV floor formula" in text
  for name in ("SiD (alpha 1.2)", "UI exact forward_kl"):
    line = next(l for l in text.splitlines() if l.startswith(f"| {name} |"))
    assert "| 1/3 |" in line and "–" not in line.split("|")[10]
  assert "UI exact forward_kl: modes >= 95%" in text
  assert "2/27 runs of the image_mixture grid finished" in text
  ceilings = json.loads((out / "image_mixture" / "ceilings.json").read_text())
  assert ceilings["ode_regression"]["steps"] == 20 and ceilings["ode_regression_long"]["steps"] == 80
  assert "regressed on the exact teacher's ODE map (20 steps" in text
  assert "regressed on the exact teacher's ODE map (80 steps" in text
  assert "Told the answer" in text and "The denoiser the seed-0 MLP rows start from" in text
  row = json.loads((out / "image_mixture" / "sid-official-reverse_kl-s0" / "row.json").read_text())
  assert len(row["commit"]) >= 40
  summary = json.loads((out / "image_mixture" / "sid-official-reverse_kl-s0" /
                        "summary.json").read_text())
  assert summary["num_modes"] == 4 and summary["init"]["num_samples"] == 10_000
  assert (figures / "mixture-means.png").stat().st_size > 0
  # Rerun: finished rows are skipped (their summaries are not rewritten).
  mtime = (out / "image_mixture" / "sid-official-reverse_kl-s0" / "summary.json").stat().st_mtime_ns
  assert compare.main(argv) == 0
  assert (out / "image_mixture" / "sid-official-reverse_kl-s0" /
          "summary.json").stat().st_mtime_ns == mtime
  # Another grid setting in the same --out is refused.
  assert compare.main(argv[:-1] + ["--set=training.batch_size=64"]) == 2


def test_effective_clip_per_row():
  base = compare.base_config("toy2d")
  clips = {r.name: compare.effective_clip(compare.row_config(base, r, 0))
           for r in compare.grid_rows("toy2d")}
  assert clips["SiD (alpha 1.2)"] == clips["UI exact reverse_kl"] == "r unused"
  assert clips["f-distill forward_kl"] == clips["UI official jeffreys"] == "[0.25, 4]"
  assert clips["UI exact jeffreys unclipped"] == "none"


def test_setup_reports_bad_image_mixture_data_as_setup_error(tmp_path):
  from uni_instruct_jax import builders  # pylint: disable=g-import-not-at-top
  config = compare.base_config("image_mixture", settings={"data.path": str(tmp_path / "no.zip")})
  with pytest.raises(builders.SetupError, match=r"^config.data: image zip .* does not exist"):
    builders.setup(config, str(tmp_path / "wd"))


@pytest.mark.slow
def test_songunet_rows_train_image_networks_on_the_image_mixture(tmp_path):
  """The SongUNet rows: NHWC image networks (the modules of CIFAR-10 proper) fitted to the exact
  teacher, the mixture's samples as [B, R, R, 3] batches, one finite step of each program."""
  if not ZIP.is_file():
    pytest.skip(f"{ZIP} absent")
  from uni_instruct_jax import builders, steps  # pylint: disable=g-import-not-at-top
  base = compare.base_config("image_mixture", settings={
      "data.num_modes": 4, "teacher.fit_steps": 2, "training.batch_size": 8})
  row = next(r for r in compare.grid_rows("image_mixture") if r.network == "songunet")
  config = compare.row_config(base, row, 0)
  steps_of = lambda c: c.training.total_kimg * 1000 / c.training.batch_size
  assert config.training.batch_size == 64 and steps_of(config) == steps_of(base)
  config.teacher.fit_steps, config.teacher.fit_batch, config.training.batch_size = 2, 8, 8
  run = builders.setup(config, str(tmp_path / "wd"))
  assert run.nets.data_shape == (8, 8, 3) and "model" in run.state.gen_params
  batch = run.dataset.next()
  assert batch["image"].shape == (8, 8, 8, 3)
  flat = run.mixture.to_flat(batch["image"])  # the layout the mixture's metrics read
  nearest = np.linalg.norm(flat[:, None] - run.mixture.means[None], axis=-1).min(axis=1)
  assert nearest.max() < 2 * run.mixture.std * np.sqrt(run.mixture.dim)  # s sqrt(d) = 0.69
  state, m_fake = run.fake_step_fn(run.state, batch, run.frozen)
  state, m_gen = run.gen_step_fn(steps.phase_at(10**9, run.step_fn.cfg))(state, batch, run.frozen)
  assert np.isfinite(float(m_fake["loss_fake"])) and np.isfinite(float(m_gen["loss_gen"]))
  assert compare.row_id(row, 0).endswith("-songunet-s0")


def test_image_networks_must_fit_the_mixture(tmp_path):
  from uni_instruct_jax import builders  # pylint: disable=g-import-not-at-top
  config = compare.base_config("toy2d", settings={"network.class_name": "EDMPrecond"})
  with pytest.raises(builders.SetupError, match=r"^config.network: .*needs image data"):
    builders.setup(config, str(tmp_path / "a"))
  if not ZIP.is_file():
    pytest.skip(f"{ZIP} absent")
  row = next(r for r in compare.grid_rows("image_mixture") if r.network == "songunet")
  config = compare.row_config(compare.base_config("image_mixture"), row, 0)
  config.network.kwargs.img_resolution = 16
  with pytest.raises(builders.SetupError, match=r"^config.network: .*must be 8/3"):
    builders.setup(config, str(tmp_path / "b"))
