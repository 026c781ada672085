import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd15():
    from difstudy.models import load

    return load("tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from difstudy.models import load

    return load("tiny-sdxl")


def unet_inputs(pipe, batch=2, seed=0):
    """Random (sample, timestep, kwargs) for one forward of a tiny pipeline's U-Net."""
    g = torch.Generator().manual_seed(seed)
    u = pipe.unet
    s = u.config.sample_size
    x = torch.randn(batch, 4, s, s, generator=g)
    kw = dict(encoder_hidden_states=torch.randn(batch, 77, u.config.cross_attention_dim, generator=g))
    if u.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, 1280, generator=g), time_ids=torch.rand(batch, 6, generator=g)
        )
    return x, torch.tensor([10] * batch), kw


def lora_folder(tmp_path, seed=0):
    """A random (non-zero) LoRA on the attention projections of tiny-sd15, saved in diffusers format."""
    from peft import LoraConfig

    from difstudy.models import load
    from difstudy.train.lora import TARGET_MODULES, save_lora

    pipe = load("tiny-sd15")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(TARGET_MODULES))
    pipe.unet.add_adapter(cfg, adapter_name="default")
    save_lora(pipe, tmp_path / "lora")
    return tmp_path / "lora"


class SelectOnly:
    """What gate_sources reads of a TechniqueFeatures: select and _check_bucket."""

    seed = 0

    def select(self, bucket, label=None):
        return (bucket, label)

    def _check_bucket(self, bucket):
        return bucket[0], int(bucket[1])


# -- the test session's record for `difstudy report` (README command B's numbers) ------------
_SESSION: dict = {}


def pytest_sessionstart(session):
    import time

    _SESSION["t0"] = time.time()


def pytest_collection_modifyitems(config, items):
    _SESSION["slow"] = sum(1 for item in items if item.get_closest_marker("slow") is not None)


def _selection(config) -> str:
    """What narrows this session below the whole suite ('' for the whole suite)."""
    from pathlib import Path

    root = Path(config.rootpath)
    parts = []
    args = [a for a in config.args if Path(root, a).resolve() != (root / "tests").resolve()]
    if args:
        parts.append(f"paths {args}")
    for opt in ("keyword", "markexpr"):
        if getattr(config.option, opt, ""):
            parts.append(f"-{opt[0]} {getattr(config.option, opt)!r}")
    if getattr(config.option, "lf", False) or getattr(config.option, "deselect", None):
        parts.append("--lf/--deselect")
    return "; ".join(parts)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Write ``results/tests.json`` (counts, wall time, commit) after a session over the whole suite."""
    import json
    import time
    from pathlib import Path

    from difstudy.fileio import write_text_atomic
    from difstudy.study import git_commit

    selection = _selection(config)
    if selection or "t0" not in _SESSION:
        return
    stats = terminalreporter.stats
    rec = {k: len(stats.get(k, [])) for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    root = Path(config.rootpath)
    rec.update(
        seconds=round(time.time() - _SESSION["t0"], 1),
        slow=_SESSION.get("slow", 0),
        commit=git_commit(root),
        cpus=os.cpu_count(),
        selection=selection,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    write_text_atomic(root / "results" / "tests.json", json.dumps(rec, indent=2) + "\n")
