"""The rehearsal of the GPU study (issue 23): the full parameters scaled for a CPU, the rehearsal
folder (links to the notebooks, its own parameter files, data root and book configuration with the
banner). The whole rehearsal run is `difstudy run --params full --rehearse` (see .ci/run)."""

from __future__ import annotations

import pytest
import yaml

from difstudy import rehearsal as R
from difstudy.errors import DifstudyError
from difstudy.study import ROOT, load_params, notebook_names


def test_full_parameters_are_scaled_and_every_change_is_said():
    values, changes = R.rehearse_params(load_params("property_noise", "full"), "/data", "/lora")
    assert values["model"] == "sd15"  # the real name: load() gives the stand-in
    assert values["image_size"] == R.IMAGE_SIZE and values["seeds"] == [0, 1]
    assert values["device"] == "cpu" and values["dtype"] == "fp32" and values["n_images"] == 2
    assert any(c.startswith("image_size: 512 -> 64") for c in changes) and len(changes) == 5
    bench, _ = R.rehearse_params(load_params("benchmark_tables", "full"), "/data", "/lora")
    assert bench["data_root"] == "/data" and bench["n_train"] == R.MINIMUM["n_train"] and bench["n_pairs"] == 4
    gate, changes = R.rehearse_params(load_params("gate", "full"), "/data", "/lora")
    assert gate["lora"] == "/lora" and gate["controlnet"] == "sd15-canny" and gate["n_train"] == 20
    assert gate["img2img_steps"] == 40 and any("random LoRA of rank 8" in c for c in changes)  # t = 25 needs 40
    assert gate["denoising_from"] == gate["timestep"] + R.DENOISE_SPAN == 52  # official 60: 10 guided steps
    assert gate["seeds"] == [0, 1]  # SEEDS without the page; the gate page's own count with it
    paged, changes = R.rehearse_params(load_params("gate", "full"), "/data", "/lora", page="gate")
    assert paged["seeds"] == [0] and "seeds: [0, 1, 2, 3, 4] -> [0] (first 1 seed)" in changes
    small, changes = R.rehearse_params({"n_images": 1, "seeds": [0], "image_size": 32}, "/d", "/l")
    assert small == {"n_images": 1, "seeds": [0], "image_size": 32} and changes == []  # never scaled up


def test_protocol_grids_are_capped_for_the_small_images():
    """The official 128-cell concatenation, 512 px matching grid and 256 px segmentation grid (given
    or by default) are capped for 64 px images; a method and None (the activations' sizes) stay."""
    gate, changes = R.rehearse_params(load_params("gate", "full"), "/data", "/lora")
    short = {"head_epochs": 1, "head_steps_per_epoch": 50}  # the conv head's 10,000 steps, shortened
    assert gate["correspondence"] == {"method": "conv", "concat_size": 16, "match_size": 64, **short}
    assert gate["part_seg"] == {"resolution": 32, "n_models": 2, "max_epochs": 4}  # the pixel-MLP ensemble
    assert gate["amalgamation"]["epochs"] == R.AMALGAMATION_EPOCHS
    assert any("concat_size 128 -> 16, match_size 512 -> 64" in c for c in changes)
    assert any("n_models 10 -> 2, max_epochs 100 -> 4" in c for c in changes)
    kept = {"task": "correspondence", "protocol": {"concat_size": None, "match_size": None, "head_epochs": 1,
                                                   "head_steps_per_epoch": 50}}  # fmt: skip
    assert R.rehearse_params(kept, "/d", "/l") == (kept, [])
    filt, _ = R.rehearse_params({"task": "label-scarce-seg", "protocol": {}}, "/d", "/l")
    assert filt["protocol"] == {"resolution": 32, "n_models": 2, "max_epochs": 4}


def test_the_rehearsal_folder(tmp_path, monkeypatch):
    import shutil

    repo = tmp_path / "repo"
    for part in ("book", "notebooks"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("_generated", "vendor"))
    shutil.copy(ROOT / "_config.yml", repo / "_config.yml")
    names = notebook_names(repo)
    (repo / R.FOLDER / "cache" / "features").mkdir(parents=True)  # a previous rehearsal's cache
    (repo / R.FOLDER / "models").mkdir()  # and its stand-ins
    root = R.prepare_root(repo, names, progress=False)
    assert not (root / "cache").exists() and (root / "models").is_dir()  # the cache starts cold, stand-ins stay
    config = yaml.safe_load((root / "_config.yml").read_text())
    assert R.BANNER in config["title"] and R.BANNER in config["html"]["announcement"]
    for name in names:
        assert (root / "notebooks" / f"{name}.ipynb").resolve() == (repo / "notebooks" / f"{name}.ipynb").resolve()
        values = load_params(name, "rehearsal", root)
        assert set(values) == set(load_params(name, "full", repo)), name
    assert load_params("benchmark_tables", "rehearsal", root)["data_root"] == str(root / "data")
    assert (root / "data" / "SPair-71k" / "PairAnnotation" / "test").is_dir()
    assert (root / "data" / "cifar-10-batches-py" / "test_batch").is_file()


def test_rehearse_needs_the_full_parameters():
    from difstudy.cli import build_parser

    a = build_parser().parse_args(["run", "--rehearse", "--params", "ci"])
    with pytest.raises(DifstudyError, match="use --params full"):
        a.fn(a)


def test_banner_cell_and_check(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("1")])
    path = tmp_path / "page.ipynb"
    nbformat.write(nb, path)
    R.add_banner(path)
    R.add_banner(path)  # once only
    cells = nbformat.read(path, as_version=4).cells
    assert [c.cell_type for c in cells] == ["markdown", "markdown", "code"] and R.BANNER in cells[1].source
    (tmp_path / "html").mkdir()
    (tmp_path / "html" / "a.html").write_text(f"<p>{R.BANNER}</p>")
    (tmp_path / "html" / "b.html").write_text("<p>results</p>")
    assert R.check_banner(tmp_path / "html", ["a", "b", "c"]) == ["b", "c"]


def test_every_full_parameter_file_names_a_real_model_or_says_why():
    from difstudy.models import resolve_name, standins

    for name in notebook_names():
        path = ROOT / "notebooks" / f"{name}.full.yaml"
        text = path.read_text()
        values = yaml.safe_load(text)
        model = values.get("model")
        if model is not None and standins.standin_name(resolve_name(model)):
            continue
        why = "".join(line for line in text.splitlines(True) if line.startswith("#"))
        assert why.strip(), f"{path.name}: model {model!r} is not a real model and the file does not say why"


def test_random_lora_of_the_recipe_loads_and_changes_the_output(tmp_path):
    """The random LoRA of the rehearsal and the bench (models.save_random_lora): every Linear layer
    the recipe targets gets both matrices, it loads as a diffusers LoRA, and it changes the output."""
    import torch

    from difstudy.gate import load_lora
    from difstudy.models import LORA_TARGET_MODULES, load, save_random_lora

    tiny_sd15 = load("tiny-sd15")  # its own copy: the adapter stays in it
    unet = tiny_sd15.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    folder = save_random_lora(unet, tmp_path / "lora", rank=4, seed=1)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # unet untouched
    targets = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LORA_TARGET_MODULES)]
    state = tiny_sd15.lora_state_dict(str(folder))[0]
    assert len(state) == 2 * len(targets) > 0
    g = torch.Generator().manual_seed(0)
    s = unet.config.sample_size
    x, e = torch.randn(1, 4, s, s, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        base = unet(x, torch.tensor([50]), encoder_hidden_states=e).sample
        load_lora(tiny_sd15, folder, "random")
        adapted = unet(x, torch.tensor([50]), encoder_hidden_states=e).sample
    assert (adapted - base).abs().max() > 1e-4


def test_stand_ins_are_cast_without_diffusers_to_dtype_warning(tmp_path, monkeypatch):
    """diffusers' ModelMixin.to(dtype) logs "There are modules in ... that should be kept in float32: []"
    even for models without such modules; in a page that builds a stand-in it failed the rehearsal
    book's check. Stand-ins and tiny models are cast with torch's Module.to (models.cast)."""
    import torch
    from diffusers import ModelMixin

    from difstudy.models import cast, load, standins

    real_to = ModelMixin.to

    def no_dtype(self, *args, **kwargs):
        assert "dtype" not in kwargs and not any(isinstance(a, torch.dtype) for a in args), "ModelMixin.to(dtype)"
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "to", no_dtype)
    unet = load("tiny-sd15").unet
    folder = standins._saved(tmp_path / "standin", lambda: unet, "config.json")
    assert (folder / "config.json").exists() and next(unet.parameters()).dtype == torch.float16
    pipe = load("tiny-sd15", dtype="fp32")
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    assert cast(pipe.vae, torch.float16) is pipe.vae and next(pipe.vae.parameters()).dtype == torch.float16
