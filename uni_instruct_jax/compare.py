"""The method/divergence comparison (issue 11): a resumable grid of runs and docs/results.md.

  python -m uni_instruct_jax.compare --grid=toy2d --out=/tmp/compare [--steps=N] [--rows=A,B]
  python -m uni_instruct_jax.compare --grid=image_mixture --out=/tmp/compare
  python -m uni_instruct_jax.compare --report-only --out=/tmp/compare

Each row (a method / mode / divergence / ratio clip, one seed) is a run of `train` in its own
workdir OUT/<grid>/<row id>; a row with a summary.json is done and skipped on rerun, an unfinished
one resumes from its checkpoints. row.json records the row's knobs, the git commit it ran at and
its wall time. Every run of a grid shares the grid's config (configs/toy2d.py or
configs/cifar10_mixture.py, plus --steps / --set, recorded in OUT/<grid>/grid.json): the rows differ
only in the knobs listed in the table. After running, the report (--doc, default docs/results.md;
PNGs under --figures) is regenerated from every grid under OUT.
"""

import argparse
import ast
import dataclasses
import json
import math
import os
import pathlib
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRID_CONFIGS = {"toy2d": "configs/toy2d.py", "image_mixture": "configs/cifar10_mixture.py"}
# Rows with network="songunet" take this config's network and teacher-fit settings.
IMAGE_NETWORK_CONFIG = "configs/cifar10_mixture_unet.py"
# Knobs scaled with the run length by --steps (kimg quantities of the recipe).
SCALED_KIMG = ("training.total_kimg", "training.tick_kimg", "loss.warmup_kimg", "loss.sid_kimg",
               "ema.halflife_kimg")
UNCLIPPED = "none"
DIVERGENCES = ("reverse_kl", "forward_kl", "jeffreys", "jensen_shannon", "pearson_chi2",
               "neyman_chi2", "squared_hellinger")
MULTI_SEED = 3
CEILINGS = "ceilings.json"  # mixture_ceilings.ceilings of the image grid's base config.


class CompareError(ValueError):
  """Bad compare input: unknown grid or row, bad --set, bad --steps."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration of the grid (all its seeds share `name`)."""
  name: str
  method: str
  mode: str
  divergence: str
  seeds: int
  clip: Optional[str] = None  # UNCLIPPED: remove the config's ratio clip; None: keep it.
  network: str = "mlp"        # "songunet": IMAGE_NETWORK_CONFIG's networks and fit (image grid).
  normalizer: Optional[str] = None  # loss.overrides.normalizer of an exact row (None: config's).
  gan_weight: Optional[float] = None  # loss.overrides.gan_weight (None: the method's preset).

  @property
  def is_variant(self) -> bool:
    """A row that changes one loss knob of another row (its twin, same method/mode/divergence)."""
    return self.normalizer is not None or self.gan_weight is not None

  def overrides(self) -> Dict[str, Any]:
    out = {"loss.method": self.method, "loss.mode": self.mode, "loss.divergence": self.divergence}
    if self.normalizer:
      out["loss.overrides.normalizer"] = self.normalizer
    return out


def grid_rows(grid: str) -> List[Row]:
  """The issue's rows: the special cases, Uni-Instruct exact with every built-in divergence,
  Uni-Instruct official (forward KL, Jeffreys); toy2d adds an unclipped Jeffreys row."""
  rows = [Row("SiD (alpha 1.2)", "sid", "official", "reverse_kl", MULTI_SEED),
          Row("SiDA", "sida", "official", "reverse_kl", 1),
          Row("Diff-Instruct", "diff_instruct", "official", "reverse_kl", 1),
          Row("DMD", "dmd", "official", "reverse_kl", 1),
          Row("f-distill forward_kl", "f_distill", "official", "forward_kl", 1)]
  for div in DIVERGENCES:
    seeds = MULTI_SEED if div in ("reverse_kl", "forward_kl", "jeffreys") else 1
    rows.append(Row(f"UI exact {div}", "uni_instruct", "exact", div, seeds))
  rows += [Row(f"UI official {div}", "uni_instruct", "official", div, 1)
           for div in ("forward_kl", "jeffreys")]
  # The exact forward-KL rows with the per-sample normaliser w_f instead of the sigma-only n(sigma)
  # (biased gradient, bounded step): tests whether n(sigma) ~ 0.8 sigma at small sigma is what
  # blows the exact forward-KL student up (toy2d, 2 of 3 seeds) or collapses it (image mixture).
  rows.append(Row("UI exact forward_kl w_f normaliser", "uni_instruct", "exact", "forward_kl",
                  MULTI_SEED if grid == "toy2d" else 1, normalizer="w_f"))
  # Without the preset's GAN term (gan_weight 1e-4): tests whether that term is what holds the
  # exact reverse-KL / Jeffreys students back on toy2d (a seed-0 check gave 1.10x / 3.58x).
  rows += [Row(f"UI exact {div} no GAN", "uni_instruct", "exact", div,
               MULTI_SEED if grid == "toy2d" and div == "reverse_kl" else 1, gan_weight=0.0)
           for div in ("reverse_kl", "jeffreys")]
  if grid == "toy2d":
    rows.append(Row("UI exact jeffreys unclipped", "uni_instruct", "exact", "jeffreys", 1,
                    clip=UNCLIPPED))
  else:  # the image networks of CIFAR-10 proper learn too
    rows += [Row("SiD (alpha 1.2) SongUNet", "sid", "official", "reverse_kl", 1,
                 network="songunet"),
             Row("UI exact forward_kl SongUNet", "uni_instruct", "exact", "forward_kl", 1,
                 network="songunet")]
  return rows


def row_id(row: Row, seed: int) -> str:
  """Directory name of a row's seed."""
  clip = "-unclipped" if row.clip == UNCLIPPED else ""
  norm = f"-{row.normalizer.replace('_', '')}" if row.normalizer else ""
  norm += "" if row.gan_weight is None else ("-nogan" if row.gan_weight == 0 else
                                              f"-gan{row.gan_weight:g}")
  net = "" if row.network == "mlp" else f"-{row.network}"
  return f"{row.method}-{row.mode}-{row.divergence}{clip}{norm}{net}-s{seed}"


def parse_set(items: Sequence[str]) -> Dict[str, Any]:
  """--set KEY=VALUE pairs (VALUE a Python literal, parsed without executing code)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise CompareError(f"--set wants KEY=VALUE, got {item!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _set(config, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise CompareError(f"unknown config key {key!r}")
    node = node[p]
  if leaf not in node:
    raise CompareError(f"unknown config key {key!r}")
  node[leaf] = tuple(value) if isinstance(value, list) else value


def _get(config, key: str) -> Any:
  node = config
  for p in key.split("."):
    node = node[p]
  return node


def base_config(grid: str, steps: int = 0, settings: Optional[Dict[str, Any]] = None):
  """The grid's config: its file with `settings` (dotted key -> value), then optionally
  shortened to `steps` generator steps (every kimg knob of SCALED_KIMG scaled alike)."""
  if grid not in GRID_CONFIGS:
    raise CompareError(f"--grid must be one of {sorted(GRID_CONFIGS)}, got {grid!r}")
  config = runpy.run_path(str(ROOT / GRID_CONFIGS[grid]))["get_config"]()
  for key, value in (settings or {}).items():
    _set(config, key, value)
  if steps < 0:
    raise CompareError(f"--steps must be >= 0, got {steps}")
  if steps:
    factor = steps * config.training.batch_size / 1000 / config.training.total_kimg
    for key in SCALED_KIMG:
      _set(config, key, _get(config, key) * factor)
  return config


def row_config(base, row: Row, seed: int):
  """The base config with the row's knobs and seed."""
  config = base.copy_and_resolve_references()
  for key, value in row.overrides().items():
    _set(config, key, value)
  if row.network == "songunet":  # its networks, fit and batch; the same number of steps
    unet = runpy.run_path(str(ROOT / IMAGE_NETWORK_CONFIG))["get_config"]()
    config.network = unet.network
    config.teacher.fit_steps, config.teacher.fit_batch = unet.teacher.fit_steps, unet.teacher.fit_batch
    factor = unet.training.batch_size / config.training.batch_size
    config.training.batch_size = unet.training.batch_size
    for key in SCALED_KIMG:
      _set(config, key, _get(config, key) * factor)
  config.seed = seed
  if row.clip == UNCLIPPED and "ratio_clip" in config.loss.overrides:
    del config.loss.overrides["ratio_clip"]
  if row.gan_weight is not None:  # an optional override key the config files do not set
    config.loss.overrides.gan_weight = float(row.gan_weight)
  return config


def effective_clip(config) -> str:
  """The ratio clip a row's generator loss uses (the config's override, else the preset's);
  'r unused' when its divergence term never reads the density ratio (reverse KL)."""
  from uni_instruct_jax import losses, steps  # pylint: disable=g-import-not-at-top
  preset = steps.loss_preset(config.loss.method, config.loss.mode)
  div = config.loss.divergence if preset in losses.DIVERGENCE_METHODS else None
  options = losses.method_options(preset, div, **config.loss.overrides.to_dict())
  if options["divergence"] == "reverse_kl" or options.get("mode") == "sim":
    return "r unused"
  clip = options.get("ratio_clip")
  return "none" if clip is None else f"[{clip[0]:g}, {clip[1]:g}]"


def git_commit() -> str:
  """HEAD of the repository (+ '-dirty' with uncommitted changes to tracked files)."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("-dirty" if dirty else "")


def run_grid(grid: str, out: pathlib.Path, steps: int = 0, settings: Optional[Dict[str, Any]] = None,
             only: Optional[Sequence[str]] = None, max_seeds: int = MULTI_SEED) -> List[str]:
  """Runs the grid's missing rows (in order; seeds 0..min(row.seeds, max_seeds) - 1) in-process;
  returns the row ids run now. A row that raises is recorded in error.txt and skipped."""
  from uni_instruct_jax import train  # pylint: disable=g-import-not-at-top
  gdir = out / grid
  gdir.mkdir(parents=True, exist_ok=True)
  record = json.loads(json.dumps({"grid": grid, "config": GRID_CONFIGS[grid], "steps": steps,
                                  "settings": settings or {}}))  # tuples as JSON lists
  grid_json = gdir / "grid.json"
  if grid_json.exists() and json.loads(grid_json.read_text()) != record:
    raise CompareError(f"{gdir} holds a grid run with other settings "
                       f"({grid_json.read_text().strip()}); use another --out")
  grid_json.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
  base = base_config(grid, steps, settings)
  os.environ.setdefault("UNI_INSTRUCT_FIT_CACHE", str(out / "cache"))
  rows = grid_rows(grid)
  names = {r.name for r in rows}
  for name in only or ():
    if name not in names:
      raise CompareError(f"unknown row {name!r}; rows: {sorted(names)}")
  ran = []
  for row in rows:
    if only and row.name not in only:
      continue
    for seed in range(min(row.seeds, max_seeds)):
      wd = gdir / row_id(row, seed)
      if (wd / "summary.json").exists():
        continue
      config = row_config(base, row, seed)
      wd.mkdir(parents=True, exist_ok=True)
      info = {"name": row.name, "seed": seed, **dataclasses.asdict(row),
              "ratio_clip": effective_clip(config), "lr": config.optim.lr,
              "gen_lr": config.optim.gen_lr, "commit": git_commit()}
      print(f"compare: {grid} row {row_id(row, seed)}", flush=True)
      start = time.time()
      try:
        train.train_and_evaluate(config, str(wd))
      except Exception:  # pylint: disable=broad-except
        (wd / "error.txt").write_text(traceback.format_exc())
        print(f"compare: row {row_id(row, seed)} failed (see {wd / 'error.txt'})", flush=True)
        continue
      info["wall_s"] = round(time.time() - start, 1)
      (wd / "row.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
      ran.append(row_id(row, seed))
  if grid == "image_mixture":  # what the MLP rows' networks reach whatever the loss (cached)
    from uni_instruct_jax import mixture_ceilings  # pylint: disable=g-import-not-at-top
    print("compare: image_mixture architecture ceilings (mixture_ceilings.py)", flush=True)
    (gdir / CEILINGS).write_text(json.dumps(mixture_ceilings.ceilings(base), indent=2,
                                            sort_keys=True) + "\n")
  return ran


# --------------------------------------------------------------------------------------------
# Report


def _stat(values: Sequence[float], fmt: str) -> str:
  """'m' for one value, 'm ± s' (sample std) for more; '–' for none."""
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return "–"
  if len(values) == 1:
    return format(values[0], fmt)
  return f"{format(np.mean(values), fmt)} ± {format(np.std(values, ddof=1), fmt)}"


def _load_rows(gdir: pathlib.Path, grid: str) -> List[Tuple[Row, List[Dict[str, Any]], int]]:
  """(row, [summary + row.json of each finished seed], failed seeds) in grid order."""
  out = []
  for row in grid_rows(grid):
    done, failed = [], 0
    for seed in range(row.seeds):
      wd = gdir / row_id(row, seed)
      if (wd / "summary.json").exists() and (wd / "row.json").exists():
        last = (wd / "metrics.jsonl").read_text().strip().splitlines()[-1]
        done.append({**json.loads((wd / "summary.json").read_text()),
                     "row": json.loads((wd / "row.json").read_text()),
                     "last_tick": json.loads(last)})
      elif (wd / "error.txt").exists():
        failed += 1
    out.append((row, done, failed))
  return out


def _knob_cells(row: Row, runs: List[Dict[str, Any]], base) -> List[str]:
  """The row's knobs (from its config, as run_grid builds it) and its finished seeds."""
  config = row_config(base, row, 0)
  steps = int(round(config.training.total_kimg * 1000 / config.training.batch_size))
  net = config.network.class_name
  net = "MLP " + "x".join(map(str, config.network.kwargs.hidden)) if net == "MLPPrecond" else (
      f"{config.network.kwargs.model_type} {config.network.kwargs.model_channels}ch")
  mode = row.mode
  if row.mode == "exact" and "normalizer" in config.loss.overrides:
    mode += f" (n: {config.loss.overrides.normalizer})"
  if "gan_weight" in config.loss.overrides:
    mode += f", GAN weight {config.loss.overrides.gan_weight:g}"
  return [row.name, row.method, mode, row.divergence, effective_clip(config),
          f"{config.optim.gen_lr:g} / {config.optim.lr:g}", str(steps),
          f"{net}, batch {config.training.batch_size}, fit {config.teacher.fit_steps}",
          f"{len(runs)}/{row.seeds}"]


KNOB_HEADER = ["row", "method", "mode (exact: normaliser)", "divergence", "ratio clip",
               "lr gen / fake", "steps", "networks, batch, teacher fit steps", "seeds done"]


TICK_HEADER = ["r min–max, last tick (seed 0)", "disc. trained"]


def _tick_cells(runs: List[Dict[str, Any]]) -> List[str]:
  """The density ratio's range over the last tick (seed 0) and whether the discriminator trained
  (metrics.jsonl has loss_disc)."""
  if not runs:
    return ["–", "–"]
  tick = runs[0]["last_tick"]
  r = f"{tick['r_min']:.3g}–{tick['r_max']:.3g}" if "r_min" in tick else "–"
  return [r, "yes" if "loss_disc" in tick else "no"]


def _untrained_ratio_findings(loaded, base) -> List[str]:
  """Rows whose loss reads r = exp(discriminator logit) while their discriminator never trained."""
  return [f"{row.name} reads the density ratio r but its discriminator never trained (no "
          "loss_disc in metrics.jsonl): its r is an untrained network's output."
          for row, runs, _ in loaded
          if runs and _tick_cells(runs)[1] == "no"
          and effective_clip(row_config(base, row, 0)) != "r unused"]


def _variant_findings(loaded, metric: Callable[[Dict[str, Any]], float],
                         init_metric: Callable[[Dict[str, Any]], float], name: str) -> List[str]:
  """Each variant row (its own normaliser or GAN weight) next to its twin, the same method / mode /
  divergence / clip / network row with the config's knobs: `metric` of every seed (lower is
  better) and how many seeds diverged (ended above `init_metric`, their initial generator's)."""
  def describe(runs):
    worse = sum(metric(r) > init_metric(r) for r in runs)
    return (f"{name} " + ", ".join(f"{metric(r):.4g}" for r in runs)
            + f" by seed ({worse}/{len(runs)} diverged)")

  twins = {(r.method, r.mode, r.divergence, r.clip, r.network): (r, runs)
           for r, runs, _ in loaded if not r.is_variant}
  out = []
  for row, runs, _ in loaded:
    other = twins.get((row.method, row.mode, row.divergence, row.clip, row.network))
    if row.is_variant and runs and other and other[1]:
      out.append(f"{row.name}: {describe(runs)}; {other[0].name}: {describe(other[1])}.")
  return out


def _table(header: List[str], lines: List[List[str]]) -> str:
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(line) + " |" for line in lines])


def _commits(loaded) -> str:
  commits = sorted({r["row"]["commit"] for _, runs, _ in loaded for r in runs})
  return ", ".join(f"`{c}`" for c in commits) or "none"


def _config_steps(grid: str, settings: Optional[Dict[str, Any]] = None) -> int:
  """Generator steps of the grid's config (with settings) at its own run length."""
  config = base_config(grid, 0, settings)
  return int(round(config.training.total_kimg * 1000 / config.training.batch_size))


def _toy2d_section(gdir: pathlib.Path, record: Dict[str, Any], figures: pathlib.Path,
                   steps: int) -> List[str]:
  loaded = _load_rows(gdir, "toy2d")
  base = base_config("toy2d", record["steps"], record["settings"])
  runs_all = [r for _, runs, _ in loaded for r in runs]
  lines, findings, targets = [], [], []
  teacher = runs_all[0]["teacher_metric"] if runs_all else None
  for row, runs, failed in loaded:
    w2 = [r["student_metric"] for r in runs]
    ratio = [v / teacher for v in w2] if teacher else []
    modes = [r["student_modes_covered"] for r in runs]
    lines.append(_knob_cells(row, runs, base) + [
        _stat(w2, ".4f"), _stat(ratio, ".2f"), _stat(modes, ".1f"),
        _stat([r["init_metric"] for r in runs], ".4f")] + _tick_cells(runs) + [str(failed)])
    if runs:
      met = max(ratio) <= 1.5
      targets.append(f"{row.name}: {'met' if met else 'not met'} (worst seed "
                     f"{max(ratio):.2f}x the teacher)")
      worse = sum(r["student_metric"] > r["init_metric"] for r in runs)
      if worse:
        findings.append(f"{row.name} ends worse than the generator at initialisation in "
                        f"{worse}/{len(runs)} seeds (diverged).")
      if min(modes) < runs[0]["num_modes"]:
        findings.append(f"{row.name} misses modes in at least one seed "
                        f"(min {min(modes)}/{runs[0]['num_modes']}).")
    png = gdir / row_id(row, 0) / "scatter.png"
    if png.exists():
      shutil.copyfile(png, figures / f"toy2d-{row_id(row, 0)}.png")
  ranked = sorted((np.mean([r["student_metric"] for r in runs]), row.name)
                  for row, runs, _ in loaded if runs)
  if len(ranked) > 1:
    findings.append(f"Lowest mean sliced W2: {ranked[0][1]} ({ranked[0][0]:.4f}); highest: "
                    f"{ranked[-1][1]} ({ranked[-1][0]:.4f}).")
  out = ["## toy2d: the 2-D ring of 8 Gaussians", "",
         f"Config `{record['config']}` ({_config_steps('toy2d')} steps as shipped), "
         f"{steps} generator steps per row (batch 256), settings "
         f"{json.dumps(record['settings'])}. Sliced W2 over 256 directions of 20,000 EMA-student "
         f"samples vs exact samples; the exact teacher's 35-NFE Heun sampler scores "
         f"{teacher if teacher is None else format(teacher, '.4f')}. Rows ran at commit(s) "
         f"{_commits(loaded)}.", "",
         _table(KNOB_HEADER + ["sliced W2", "/ teacher", "modes (of 8)", "init W2"] + TICK_HEADER
                + ["failed"],
                lines), "",
         "Target (every divergence within 1.5x of the teacher's sliced W2):", ""]
  out += [f"- {t}" for t in targets] or ["- no finished rows yet"]
  out += ["", "Findings the table supports:", ""]
  if not any("misses modes" in f for f in findings) and runs_all:
    findings.insert(0, "Every finished row covers all 8 modes in every seed.")
  findings += _untrained_ratio_findings(loaded, base)
  findings += _variant_findings(loaded, lambda r: r["student_metric"],
                                   lambda r: r["init_metric"], "sliced W2")
  out += [f"- {f}" for f in findings] or ["- no finished rows yet."]
  out += ["", "Scatter plots (seed 0; red student, blue data): "
          + ", ".join(f"[{row.name}](results/toy2d-{row_id(row, 0)}.png)"
                      for row, runs, _ in loaded if runs), ""]
  return out


IMAGE_COLUMNS = (("modes", "modes_covered", ".1f"), ("balance TV", "mode_balance_tv", ".3f"),
                 ("precision", "precision", ".3f"), ("distance", "mode_distance", ".2f"),
                 ("pixel FD", "pixel_fd", ".3f"))


def _image_cells(metrics: List[Dict[str, Any]]) -> List[str]:
  return [_stat([m[key] for m in metrics], fmt) for _, key, fmt in IMAGE_COLUMNS]


def _image_targets(row: Row, runs, floor, teacher35) -> Optional[str]:
  if (row.method != "uni_instruct" or row.divergence not in ("forward_kl", "jeffreys")
      or row.network != "mlp" or not runs):
    return None
  checks = []
  for r in runs:
    s, init, k = r["student"], r["init"], r["num_modes"]
    checks.append({"modes >= 95%": s["modes_covered"] >= 0.95 * k,
                   "TV within 0.05 of floor": s["mode_balance_tv"] <= floor["mode_balance_tv"] + 0.05,
                   "precision >= 0.9": s["precision"] >= 0.9,
                   "FD <= 2x teacher 35 NFE": s["pixel_fd"] <= 2 * teacher35["pixel_fd"],
                   "FD <= init / 4": s["pixel_fd"] <= init["pixel_fd"] / 4})
  parts = [f"{name} {'met' if all(c[name] for c in checks) else 'not met'}" for name in checks[0]]
  return f"{row.name}: " + "; ".join(parts)


def _best_row(rows, key: str) -> Tuple[Row, float]:
  """(row, worst-seed value) of the row of [(row, runs)] whose worst seed has the lowest
  student[key]."""
  return min(((row, max(r["student"][key] for r in runs)) for row, runs in rows),
             key=lambda x: x[1])


def _behaviour_findings(loaded, floor, teacher35, k: int) -> List[str]:
  """The rows grouped by what their students do (every seed): spread over the modes without
  reaching them, collapsed onto a few, or diverged; and the best student against the 35-NFE
  teacher and the exact-sample floor."""
  done = [(row, [r["student"] for r in runs], [r["init"] for r in runs])
          for row, runs, _ in loaded if runs]
  if not done:
    return []
  groups = {
      "spread over the modes without reaching them (balance TV < 0.3 and precision < 0.1)":
          lambda s, i: s["mode_balance_tv"] < 0.3 and s["precision"] < 0.1,
      f"collapsed onto at most {k // 4}/{k} modes (balance TV > 0.5)":
          lambda s, i: s["modes_covered"] <= k // 4 and s["mode_balance_tv"] > 0.5
          and s["pixel_fd"] <= i["pixel_fd"] * 10,
      "diverged (pixel FD over 10x the initial generator's)":
          lambda s, i: s["pixel_fd"] > i["pixel_fd"] * 10}
  out = []
  for label, test in groups.items():
    names = [row.name for row, students, inits in done
             if all(test(s, i) for s, i in zip(students, inits))]
    if names:
      out.append(f"In every seed, {label}: {', '.join(names)}.")
  full = [row.name for row, students, _ in done
          if all(s["modes_covered"] >= 0.95 * k for s in students)]
  out.append(f"Rows covering >= 95 % of the {k} modes in every seed: "
             f"{', '.join(full) if full else 'none'}.")
  finished = [(row, runs) for row, runs, _ in loaded if runs]
  row, fd = _best_row(finished, "pixel_fd")
  row_tv, tv = _best_row(finished, "mode_balance_tv")
  out.append(f"No one-step student reaches the 35-NFE teacher: the lowest pixel FD (worst seed) "
             f"is {row.name}'s {fd:.3f}, {fd / teacher35['pixel_fd']:.1f}x the teacher's and "
             f"{fd / floor['pixel_fd']:.1f}x the exact-sample floor's; the balance TV closest to "
             f"the floor ({floor['mode_balance_tv']:.3f}) is {row_tv.name}'s {tv:.3f}."
             if fd > teacher35["pixel_fd"] else
             f"{row.name} reaches the 35-NFE teacher's pixel FD ({fd:.3f}).")
  return out


def _ceiling_findings(loaded, ceilings, teacher35, k: int) -> List[str]:
  """Sentences comparing the MLP rows with mixture_ceilings' reference rows."""
  fitted, regressed = ceilings["fitted_sampler"], ceilings["ode_regression"]
  out = [f"The denoiser the seed-0 MLP rows start from (generator and fake score), sampled with "
         f"35-NFE Heun, has precision {fitted['precision']:.3f}, distance {fitted['mode_distance']:.2f} "
         f"and pixel FD {fitted['pixel_fd']:.3f} ({fitted['pixel_fd'] / teacher35['pixel_fd']:.1f}"
         "x the exact teacher's from the same latents): the fake score's architecture and fit do "
         "not represent the data law to the precision target's accuracy."
         if fitted["precision"] < 0.9 else
         f"The fitted denoiser, sampled with 35-NFE Heun, has precision {fitted['precision']:.3f}."]
  reg_fd = regressed["pixel_fd"] / teacher35["pixel_fd"]
  sentence = (f"Told the answer (regression on the exact teacher's noise-to-sample map), a one-step "
              f"generator with the MLP rows' architecture, start and budget reaches precision "
              f"{regressed['precision']:.3f}, distance {regressed['mode_distance']:.2f}, "
              f"{regressed['modes_covered']}/{k} modes and pixel FD {regressed['pixel_fd']:.3f} "
              f"({reg_fd:.1f}x the exact teacher's)")
  if regressed["precision"] < 0.9 and reg_fd > 2:
    sentence += ": the precision and FD targets are out of its reach at this budget even so"
  long = ceilings["ode_regression_long"]
  out.append(sentence + f"; with {long['steps']} steps: precision {long['precision']:.3f}, "
             f"distance {long['mode_distance']:.2f}, {long['modes_covered']}/{k} modes, pixel FD "
             f"{long['pixel_fd']:.3f} ({long['pixel_fd'] / teacher35['pixel_fd']:.1f}x).")
  mlp = [(row, runs) for row, runs, _ in loaded if row.network == "mlp" and runs]
  if mlp:
    row, best = _best_row(mlp, "pixel_fd")
    out.append(f"The lowest pixel FD of an MLP row (worst seed) is {row.name}'s {best:.3f}, "
               f"{best / regressed['pixel_fd']:.2f}x the regressed generator's.")
    sharp = [(row.name, max(r["student"]["precision"] for r in runs),
              max(r["student"]["modes_covered"] for r in runs))
             for row, runs in mlp if max(r["student"]["precision"] for r in runs) >= 0.1]
    if sharp:
      out.append("MLP rows with precision >= 0.1 in some seed: " + ", ".join(
          f"{name} ({p:.2f}, at most {c}/{k} modes)" for name, p, c in sharp) + ".")
  return out


def _image_section(gdir: pathlib.Path, record: Dict[str, Any], figures: pathlib.Path,
                   steps: int) -> List[str]:
  loaded = _load_rows(gdir, "image_mixture")
  base = base_config("image_mixture", record["steps"], record["settings"])
  runs_all = [r for _, runs, _ in loaded for r in runs]
  out = ["## image mixture: CIFAR-10 means, exact teacher", "",
         f"Config `{record['config']}` ({_config_steps('image_mixture')} steps as shipped), "
         f"{steps} generator steps per row, settings "
         f"{json.dumps(record['settings'])}. Metrics of 10,000 samples (uni_instruct_jax/"
         "mixture_metrics.py: modes covered by nearest mean within the chi-square radius, "
         "total-variation mode balance, precision, median distance in units of s sqrt(d), pixel "
         f"Fréchet distance to 10,000 exact samples). Rows ran at commit(s) {_commits(loaded)}.", ""]
  if not runs_all:
    return out + ["No finished rows yet.", ""]
  first = runs_all[0]
  floor, teacher = first["floor"], first["teacher"]
  base_lines = [["exact samples (floor)", "0"] + _image_cells([floor])]
  base_lines += [[f"exact teacher, {t['source'].split('_')[-1]}", str(t["nfe"])]
                 + _image_cells([t]) for t in teacher]
  inits = [r["init"] for row, runs, _ in loaded if row.network == "mlp" for r in runs]
  if inits:  # the MLP rows' generator (the SongUNet rows' is another network)
    base_lines.append(["MLP generator at init (1 step)", "1"] + _image_cells(inits))
  ceilings = (json.loads((gdir / CEILINGS).read_text()) if (gdir / CEILINGS).exists() else None)
  if ceilings:
    fitted = ceilings["fitted_sampler"]
    base_lines.append(["seed-0 MLP fit (generator and fake-score start) as a Heun sampler",
                       str(fitted["nfe"])] + _image_cells([fitted]))
    base_lines += [[f"seed-0 MLP generator regressed on the exact teacher's ODE map "
                    f"({reg['steps']} steps, rows' batch and lr)", "1"] + _image_cells([reg])
                   for reg in (ceilings["ode_regression"], ceilings["ode_regression_long"])]
  out += [_table(["baseline", "NFE"] + [c for c, _, _ in IMAGE_COLUMNS], base_lines), "",
          f"TV floor formula 0.5 sqrt(2K/(pi N)) sqrt(1 - 1/K): {floor['tv_floor_formula']:.4f}.",
          "The last three baselines (uni_instruct_jax/mixture_ceilings.py, seed 0's fit) measure "
          "what the MLP rows' networks reach whatever the distillation loss: the fake score's "
          "architecture and fit as a 35-NFE sampler, and a one-step generator of the rows' "
          "architecture and start trained by regression on the exact teacher's deterministic map "
          "from noise to sample (told the answer) with the rows' budget and with "
          f"{ceilings['ode_regression_long']['steps']} steps." if ceilings else "", ""]
  lines, targets, findings = [], [], []
  k = first["num_modes"]
  for row, runs, failed in loaded:
    lines.append(_knob_cells(row, runs, base) + _image_cells([r["student"] for r in runs])
                 + _tick_cells(runs) + [str(failed)])
    target = _image_targets(row, runs, floor, teacher[0])
    if target:
      targets.append(target)
    if runs:
      covered = min(r["student"]["modes_covered"] for r in runs)
      fd = max(r["student"]["pixel_fd"] for r in runs)
      findings.append(f"{row.name}: at least {covered}/{k} modes covered; pixel FD at most "
                      f"{fd / teacher[0]['pixel_fd']:.2f}x the 35-NFE teacher's.")
  out += [_table(KNOB_HEADER + [c for c, _, _ in IMAGE_COLUMNS] + TICK_HEADER + ["failed"], lines),
          "",
          "Targets (Uni-Instruct forward KL and Jeffreys; every seed):", ""]
  out += [f"- {t}" for t in targets] or ["- no finished forward-KL / Jeffreys row yet"]
  findings += _behaviour_findings(loaded, floor, teacher[0], k)
  findings += _untrained_ratio_findings(loaded, base)
  findings += _variant_findings(loaded, lambda r: r["student"]["pixel_fd"],
                                   lambda r: r["init"]["pixel_fd"], "pixel FD")
  if ceilings:
    findings += _ceiling_findings(loaded, ceilings, teacher[0], k)
  out += ["", "Findings the table supports:", ""] + [f"- {f}" for f in findings] + [""]
  out += _image_figures(gdir, record, figures, loaded, steps)
  return out


def _image_figures(gdir, record, figures, loaded, steps) -> List[str]:
  """PNG grids: the K means, the teacher's 35-NFE samples, each row's seed-0 student."""
  import jax  # pylint: disable=g-import-not-at-top
  from uni_instruct_jax import mixture_metrics, sampling, toy_run  # pylint: disable=g-import-not-at-top
  mixture = toy_run.build_mixture(base_config("image_mixture", steps, record["settings"]))
  sampling.save_image_grid(mixture.to_images(mixture.means), figures / "mixture-means.png")
  latents = jax.random.normal(jax.random.key(0), (64, mixture.dim))
  teacher = mixture_metrics._chunked(  # pylint: disable=protected-access
      lambda z: sampling.heun_sampler(lambda x, s, _: mixture.denoiser(x, s), z, num_steps=18),
      latents, 64)
  sampling.save_image_grid(mixture.to_images(teacher), figures / "mixture-teacher35.png", (8, 8))
  links = ["[K means](results/mixture-means.png)",
           "[teacher 35 NFE](results/mixture-teacher35.png)"]
  for row, runs, _ in loaded:
    png = gdir / row_id(row, 0) / "scatter.png"
    if runs and png.exists():
      shutil.copyfile(png, figures / f"mixture-{row_id(row, 0)}.png")
      links.append(f"[{row.name}](results/mixture-{row_id(row, 0)}.png)")
  return ["Sample grids (seed 0, 64 one-step student samples): " + ", ".join(links), ""]


def _status(gdir: pathlib.Path, grid: str, record: Dict[str, Any]) -> List[str]:
  loaded = _load_rows(gdir, grid)
  done = sum(len(runs) for _, runs, _ in loaded)
  total = sum(row.seeds for row, _, _ in loaded)
  sets = " ".join(shlex.quote(f"--set={k}={v!r}") for k, v in record["settings"].items())
  steps = f" --steps={record['steps']}" if record["steps"] else ""
  wall = sum(r["row"].get("wall_s", 0.0) for _, runs, _ in loaded for r in runs)
  return [f"Status: {done}/{total} runs of the {grid} grid finished, in {wall / 3600:.2f} h of "
          "wall time (the rows' row.json wall_s summed: teacher fits included, measured on a "
          "2-core machine that often ran two grid processes at once). "
          + ("Rerunning it skips every finished row:" if done == total else
             "To complete it (resumes; finished rows are skipped):"), "",
          f"    nice -n 10 python -m uni_instruct_jax.compare --grid={grid} --out=OUT{steps} {sets}",
          ""]


def write_report(out: pathlib.Path, doc: pathlib.Path, figures: pathlib.Path) -> str:
  """Regenerates the markdown report of every grid under `out`; returns its text."""
  figures.mkdir(parents=True, exist_ok=True)
  text = ["# Results: distillation methods and divergences compared", "",
          "Generated by `python -m uni_instruct_jax.compare` (uni_instruct_jax/compare.py); "
          "every number below is read from the runs' summary.json files (and the image grid's "
          "ceilings.json). All rows of a grid share "
          "its config, budget (generator steps, batch) and seeds 0..n-1; the knob columns list "
          "everything that differs. The first 10 % of every run is the recipe's SiD-only phase "
          "(alpha 1, no GAN) and the first 5 % a generator warm-up, for every method alike. "
          "Each grid states the commits its rows ran at.", ""]
  for grid in GRID_CONFIGS:
    gdir = out / grid
    if not (gdir / "grid.json").exists():
      text += [f"## {grid}", "", "Not run yet:", "",
               f"    nice -n 10 python -m uni_instruct_jax.compare --grid={grid} --out=OUT", ""]
      continue
    record = json.loads((gdir / "grid.json").read_text())
    steps = record["steps"] or _config_steps(grid, record["settings"])
    section = _toy2d_section if grid == "toy2d" else _image_section
    text += section(gdir, record, figures, steps) + _status(gdir, grid, record)
  doc.parent.mkdir(parents=True, exist_ok=True)
  doc.write_text("\n".join(text))
  return "\n".join(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--grid", choices=sorted(GRID_CONFIGS))
  parser.add_argument("--out", required=True, help="root of the grids' run directories")
  parser.add_argument("--steps", type=int, default=0, help="generator steps per row (0: config's)")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every row")
  parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
  parser.add_argument("--max-seeds", type=int, default=MULTI_SEED)
  parser.add_argument("--report-only", action="store_true")
  parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
  parser.add_argument("--figures", default=str(ROOT / "docs" / "results"))
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  try:
    if not args.report_only:
      if not args.grid:
        raise CompareError("--grid is required unless --report-only")
      only = [r for r in args.rows.split(",") if r]
      run_grid(args.grid, out, args.steps, parse_set(args.set), only, args.max_seeds)
    write_report(out, pathlib.Path(args.doc), pathlib.Path(args.figures))
  except CompareError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.doc}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
