"""``difstudy run --params full --rehearse``: the GPU study rehearsed on a CPU (issue 23).

Every notebook runs with its ``full`` parameters, through the same code paths as on a GPU runner,
with four substitutions, each printed and shown on every page:

- **models**: each real model is a random-weight stand-in of the same architecture and
  configuration (:mod:`difstudy.models.standins`: SD1.5 at its real widths 320/640/1280/1280 and its
  real canny ControlNet), and a LoRA path that does not exist is a random LoRA of difstudy's
  recipe (rank 8, alpha 8, the attention projections) on the stand-in;
- **devices**: ``cuda`` becomes ``cpu`` and fp16 / bf16 fp32 (:func:`difstudy.models.rehearsal_device`);
- **data**: the data root is the toy world exported in the real datasets' official layouts
  (:func:`difstudy.data.export.to_data_root`), so the same loaders read it;
- **sizes** (:func:`rehearse_params`): image sizes become :data:`IMAGE_SIZE`, counts are
  multiplied by :data:`COUNT_FACTOR` (never below their :data:`MINIMUM`; "all" becomes that
  minimum), seed lists keep their first :data:`SEEDS`, sampling steps become :data:`STEPS`,
  the protocols' grids are capped (:data:`GRID_CAPS`) and their training shortened
  (:data:`TRAIN_CAPS`, :data:`AMALGAMATION_EPOCHS`).

**What the full run will cost**: every notebook's U-Net forwards, samples, cache growth and peak
memory are counted as it runs (:mod:`difstudy.costs`); :func:`cost_table` scales them to the full
parameters and, with the GPU rate of the last ``difstudy bench --device cuda``, to GPU minutes
(``_rehearsal/results/costs.csv``, and the rehearsal's performance page).

Everything runs in a folder of its own (``_rehearsal/``, :data:`FOLDER`): its notebooks folder
holds links to the real notebooks and their ``<name>.rehearsal.yaml`` parameter files, its results,
caches, stand-in models, data and book are its own, so a rehearsal never touches the study's
results. Its results, book and feature cache start empty every time (a cache hit would skip the
extraction code the full run executes, and hide its cost); its stand-ins and data are kept. ``DIFSTUDY_ROOT`` points the kernels' :data:`difstudy.study.ROOT` there. Its book says
"rehearsal: random-weight stand-ins" on every page (an announcement bar and a first cell per
page), and :func:`check_banner` fails a page without it. The numbers of a rehearsal mean nothing;
what it shows is that the full run's code paths run, and how long each notebook takes at these
sizes.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from unittest.mock import patch

import yaml

from .errors import DifstudyError

FOLDER = "_rehearsal"
BANNER = "rehearsal: random-weight stand-ins"
BANNER_TEXT = (
    f"**{BANNER}.** This page ran with its `full` parameters on random-weight stand-ins of the real "
    "models, on a CPU, with the toy world in the real datasets' layouts and every size scaled down "
    "(the table below says how). Its numbers are not results; it shows that the full run's code runs."
)
ENV_ROOT = "DIFSTUDY_ROOT"
IMAGE_SIZE = 64  # px: the smallest the SD layouts take (VAE 8 x 3 downsamplers)
COUNT_FACTOR = 0.02
SEEDS = 2
STEPS = 4  # DDIM / Img2Img sampling steps
# the smallest count each parameter may have (a protocol's minimum: pairs need images of one class,
# a split needs a few of each); "all" (None) becomes this too
MINIMUM = {
    "n_images": 2,
    "n_shift_images": 2,
    "n_property_images": 2,
    "n_show": 2,
    "n_val_images": 20,
    "n_test_images": 20,
    "n_val_pairs": 4,
    "n_test_pairs": 4,
    "n_train": 20,
    "n_test": 20,
    "n_val": 10,
    "n_pairs": 4,
    "n_seg_train": 3,
    "n_seg_test": 3,
    "n_per_class": 6,
    "per_class": 6,
}
SIZE_KEYS = ("image_size", "toy_size")
# protocol configurations given as dicts (their dataclass in difstudy.protocols; "protocol" is the
# one of the page's ``task``) and the grid sizes capped in them: the official 128-cell concatenation
# and 512 px matching grid mean nothing on 64 px images and cost minutes per pair on a CPU
PROTOCOL_DICTS = {"correspondence": "correspondence", "part_seg": "label-scarce-seg", "semantic_seg": "semantic-seg"}
GRID_CAPS = {"concat_size": IMAGE_SIZE // 4, "match_size": IMAGE_SIZE, "resolution": IMAGE_SIZE // 2}
# the protocols' training shortened (the code paths stay; at the real widths the official pixel-MLP
# ensemble and the 10,000-step conv head take most of a CPU rehearsal: the gate page ran over 40 min)
TRAIN_CAPS = {"n_models": 2, "max_epochs": 4, "head_epochs": 1, "head_steps_per_epoch": 50, "epochs": 1}
AMALGAMATION_EPOCHS = 2
SEED_KEYS = ("seeds", "property_seeds", "probe_seeds")
# pages whose feature claims keep fewer seeds than SEEDS: the gate page extracts about ten technique
# sources per image and seed at the real widths and trains every probe on each (one seed: the
# claims' intervals then run over test units only, the verdict module's 1-D path)
PAGE_SEEDS = {"gate": 1}
STEP_KEYS = ("img2img_steps", "sample_steps")
# the ControlNet denoising path (GATE's official --denoising_from 60 for t = 50: 10 guided steps of
# U-Net + ControlNet per image for each of three techniques) shortened to this many steps: at the
# real widths it was most of the gate page's forwards
DENOISE_SPAN = 2
RANDOM_LORA_RANK = 8


def rehearse_params(values: dict, data_root: str, lora_root: str, page: str | None = None) -> tuple[dict, list[str]]:
    """A notebook's full parameter values scaled for the rehearsal, and one line per change
    (``page``: the notebook, for :data:`PAGE_SEEDS`)."""
    out, changes = dict(values), []
    n_seeds = PAGE_SEEDS.get(page, SEEDS)

    def change(key, new, why):
        if out.get(key) != new:
            changes.append(f"{key}: {out.get(key)!r} -> {new!r} ({why})")
            out[key] = new

    for key, value in values.items():
        if key in SIZE_KEYS and isinstance(value, int) and value > IMAGE_SIZE:
            change(key, IMAGE_SIZE, "image size")
        elif key in MINIMUM and (value is None or isinstance(value, int)):
            new = MINIMUM[key] if value is None else max(MINIMUM[key], math.ceil(value * COUNT_FACTOR))
            change(key, min(new, value) if value is not None else new, f"count x {COUNT_FACTOR:g}")
        elif key in SEED_KEYS and isinstance(value, list) and len(value) > (n := n_seeds if key == "seeds" else SEEDS):
            change(key, value[:n], f"first {n} seed" + ("s" if n > 1 else ""))
        elif key in STEP_KEYS and isinstance(value, int) and value > (steps := _fewest_steps(values)):
            change(key, steps, "sampling steps" + (f", the fewest that give t = {_smallest_t(values)} a step"
                                                   if steps > STEPS else ""))  # fmt: skip
        elif key == "denoising_from" and isinstance(value, int) and isinstance(values.get("timestep"), int):
            if value - values["timestep"] > DENOISE_SPAN:
                change(key, values["timestep"] + DENOISE_SPAN, f"ControlNet denoising path of {DENOISE_SPAN} steps")
        elif key == "device" and value not in (None, "cpu"):
            change(key, "cpu", "no GPU")
        elif key == "dtype" and value in ("fp16", "bf16", "float16", "bfloat16"):
            change(key, "fp32", "fp32 on CPU")
        elif key == "data_root" and value is not None:
            change(key, data_root, "the toy world in the real datasets' layouts")
        elif key == "lora" and isinstance(value, str) and "/" in value and not Path(value).exists():
            change(key, lora_root, f"a random LoRA of rank {RANDOM_LORA_RANK}")
        elif isinstance(value, dict) and (key in PROTOCOL_DICTS or key == "protocol"):
            task = PROTOCOL_DICTS.get(key, values.get("task"))
            grids = _cap_grids(value, task)
            capped = _cap_grids(grids, task, TRAIN_CAPS)
            if capped != value:
                what = ", ".join(f"{f} {_grid_default(value, task, f)} -> {capped[f]}" for f in capped if f not in value
                                 or capped[f] != value[f])  # fmt: skip
                change(key, capped, f"grid sizes for {IMAGE_SIZE} px images and shorter training: {what}")
        elif key == "amalgamation" and isinstance(value, dict) and value.get("epochs", 0) > AMALGAMATION_EPOCHS:
            change(key, {**value, "epochs": AMALGAMATION_EPOCHS}, "shorter training")
    return out, changes


TIMESTEP_KEYS = ("timesteps", "timestep", "guideline_timestep", "control_timesteps", "t")


def _smallest_t(values: dict) -> int | None:
    ts = [t for k in TIMESTEP_KEYS for t in (values.get(k) if isinstance(values.get(k), list) else [values.get(k)])]
    ts = [int(t) for t in ts if isinstance(t, (int, float)) and t > 0]
    return min(ts) if ts else None


def _fewest_steps(values: dict, n_train: int = 1000) -> int:
    """:data:`STEPS`, or more where an Img2Img at the page's smallest timestep t would otherwise run
    no denoising step (strength t / 1000 x steps < 1)."""
    t = _smallest_t(values)
    return max(STEPS, math.ceil(n_train / t)) if t else STEPS


def _protocol_defaults(task: str | None) -> dict:
    """The default field values of ``task``'s protocol configuration (empty for an unknown task)."""
    from dataclasses import asdict

    from .protocols.config import CorrespondenceConfig, PartSegConfig, SemSegConfig

    kinds = {"correspondence": CorrespondenceConfig, "label-scarce-seg": PartSegConfig, "semantic-seg": SemSegConfig}
    return asdict(kinds[task]()) if task in kinds else {}


def _grid_default(value: dict, task: str | None, field: str):
    return value.get(field, _protocol_defaults(task).get(field))


def _cap_grids(value: dict, task: str | None, caps: dict | None = None) -> dict:
    """``value`` with each field of ``caps`` (:data:`GRID_CAPS` by default; given or by default)
    capped; ``None`` (the activations' own sizes) is kept."""
    out, defaults = dict(value), _protocol_defaults(task)
    for field, cap in (caps or GRID_CAPS).items():
        current = value.get(field, defaults.get(field))
        if field in defaults and current is not None and current > cap:
            out[field] = cap
    return out


def random_lora(folder: Path, model: str = "sd15") -> Path:
    """A random LoRA (difstudy's recipe: rank 8, alpha 8, the attention projections; both matrices
    random, so it changes the output) on the stand-in of ``model``, saved as diffusers writes one."""
    from .models import save_random_lora, standins

    if (folder / "pytorch_lora_weights.safetensors").exists():
        return folder
    pipe = standins.standin_pipeline(model, standins.rehearsal_cache())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_random_lora(pipe.unet, tmp, RANDOM_LORA_RANK, seed=5)
    tmp.replace(folder)
    return folder


def prepare_root(repo: Path, names: list[str], progress: bool = True) -> Path:
    """The rehearsal folder under ``repo``: the book (sources, table of contents, configuration
    with the banner), a notebooks folder of links and rehearsal parameter files, the data root."""
    from .data.export import to_data_root
    from .study import load_params
    from .study import notebook_names as study_names

    root = repo / FOLDER
    root.mkdir(exist_ok=True)
    for stale in ("results", "book", "cache"):  # a cold cache: every extraction runs, as in the full run
        shutil.rmtree(root / stale, ignore_errors=True)
    shutil.copytree(repo / "book", root / "book", ignore=shutil.ignore_patterns("_generated", "vendor"))
    config = yaml.safe_load((repo / "_config.yml").read_text())
    config["title"] = f"{config['title']} ({BANNER})"
    config.setdefault("html", {})["announcement"] = f"{BANNER}: these numbers are not results"
    (root / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    nbs = root / "notebooks"
    shutil.rmtree(nbs, ignore_errors=True)
    nbs.mkdir()
    data = root / "data"
    if not (data / "SPair-71k").exists():
        to_data_root(data, n=40, size=IMAGE_SIZE, progress=False)
        print(f"[rehearsal] the toy world in the real datasets' layouts: {data}", flush=True)
    for src in sorted((repo / "notebooks").glob("*.ipynb")):
        (nbs / src.name).symlink_to(src)
    for name in study_names(repo):  # every page's file: the ledger reads them all
        full = load_params(name, "full", repo)
        values, changes = rehearse_params(full, str(data), str(root / "loras" / "random"), page=name)
        note = "".join(f"# {c}\n" for c in changes) or "# (no change)\n"
        text = f"# {name}.full.yaml for the rehearsal (difstudy.rehearsal):\n{note}" + yaml.safe_dump(values)
        (nbs / f"{name}.rehearsal.yaml").write_text(text)
        if name in names:
            print(f"[rehearsal] {name}: " + ("; ".join(changes) or "full parameters unchanged"), flush=True)
    return root


def add_banner(executed: Path) -> None:
    """A first markdown cell saying what a rehearsal page is (in place)."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    if any("difstudy-rehearsal" in c.metadata.get("tags", []) for c in nb.cells):
        return
    cell = nbformat.v4.new_markdown_cell(f"```{{warning}}\n{BANNER_TEXT}\n```")
    cell.metadata["tags"] = ["difstudy-rehearsal"]
    first = next((i + 1 for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("#")), 0)
    nb.cells.insert(first, cell)
    nbformat.write(nb, executed)


def check_banner(html_dir: Path, pages: list[str]) -> list[str]:
    """Pages of the built rehearsal book that do not say they are a rehearsal."""
    missing = []
    for page in pages:
        html = html_dir / f"{page}.html"
        if not html.exists() or BANNER not in html.read_text(errors="replace"):
            missing.append(page)
    return missing


COSTS = "costs"  # the rehearsal folder's subfolder of per-notebook counts (difstudy.costs.ENV)


def cost_table(root: Path | None = None, repo: Path | None = None):
    """:func:`difstudy.costs.table` of a rehearsal: its counts against the full and the rehearsal
    parameters of each notebook (``root``: the rehearsal folder, by default :data:`ENV_ROOT`'s)."""
    from . import costs
    from .study import load_params

    root = Path(root or os.environ.get(ENV_ROOT) or Path.cwd())
    repo = Path(repo or root.parent)
    names = [p.stem for p in sorted((root / COSTS).glob("*.json"))]
    params = {n: (load_params(n, "full", repo), load_params(n, "rehearsal", root)) for n in names}
    from .report import MEASURED, read_measured

    return costs.table(root / COSTS, params, costs.gpu_rate(read_measured(repo / MEASURED)))  # the repository's report


def run(names: list[str] | None = None, book: bool = True, repo: Path | None = None) -> list[dict]:
    """Prepare the rehearsal folder, execute the notebooks there (their ``rehearsal`` parameters),
    put the banner on every page, build and check the book."""
    from . import study
    from .models import standins

    repo = Path(repo or study.ROOT)
    all_names = study.notebook_names(repo)
    names = names or all_names
    t0 = time.time()
    root = prepare_root(repo, names)
    from . import costs

    shutil.rmtree(root / COSTS, ignore_errors=True)
    env = {ENV_ROOT: str(root), standins.REHEARSAL_ENV: str(root / "models"), costs.ENV: str(root / COSTS)}
    with patch.dict(os.environ, env):  # restored afterwards
        if any(study.load_params(n, "rehearsal", root).get("lora") == str(root / "loras" / "random") for n in names):
            random_lora(root / "loras" / "random")
        times = study.run("rehearsal", names, book=False, root=root)
        table = cost_table(root, repo)
        if len(table):
            (root / "results").mkdir(exist_ok=True)
            table.to_csv(root / "results" / "costs.csv", index=False)
            shown = [c for c in ("notebook", "forwards", "full_samples_low", "full_samples_high", "gpu_min_low",
                                 "gpu_min_high", "full_cache_gb_high", "peak_rss_mb") if c in table]  # fmt: skip
            print(
                "[rehearsal] what the full run will cost (results/costs.csv):\n" + table[shown].to_string(index=False)
            )
        for n in all_names:
            if (root / study.GENERATED / f"{n}.ipynb").exists():
                add_banner(root / study.GENERATED / f"{n}.ipynb")
        if book:
            if not (root / "book" / "_static" / "vendor").exists() and (repo / "book" / "_static" / "vendor").exists():
                shutil.copytree(repo / "book" / "_static" / "vendor", root / "book" / "_static" / "vendor")
            missing = [n for n in all_names if not (root / study.GENERATED / f"{n}.ipynb").exists()]
            if missing:
                raise DifstudyError(f"cannot build the rehearsal book: {missing} were not rehearsed")
            html = study.build_book(root)
            pages = study.toc_files(root / study.TOC)
            bare = check_banner(html, pages)
            if bare:
                raise DifstudyError(f"rehearsal pages without the '{BANNER}' banner: {bare}")
            print(f"[rehearsal] book built: {html / 'index.html'} (every page says '{BANNER}')")
    print(f"[rehearsal] {len(names)} notebooks in {(time.time() - t0) / 60:.1f} min (setup and book included)")
    return times


def run_cli(a) -> None:
    """``difstudy run``: the study (``run``), or with ``--rehearse`` its rehearsal."""
    from . import study

    names = (a.only or []) + a.notebooks or None
    if a.rehearse and a.params != "full":
        raise DifstudyError(f"--rehearse rehearses the full parameters: use --params full, not {a.params!r}")
    return run(names, not a.no_book) if a.rehearse else study.run(a.params, names, not a.no_book)
