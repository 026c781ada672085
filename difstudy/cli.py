"""Command line: ``difstudy SUBCOMMAND`` (or ``python -m difstudy SUBCOMMAND``)."""

from __future__ import annotations

import argparse
import sys

from .errors import DifstudyError


def _catalog(a) -> None:
    import pandas as pd

    from .catalog import Catalog
    from .models import layouts, load, resolve_name, standins, vae_scale_factor

    embedded = standins.standin_name(resolve_name(a.model))
    dit = layouts.layout_name(resolve_name(a.model))
    if dit:  # a diffusion transformer: its real or tiny layout, on the meta device
        rec = layouts.layout(dit)
        unet, factor, text_len = layouts.meta_transformer(dit), rec["vae_scale_factor"], rec["text_len"]
        print(f"# {a.model}: the {dit} layout ({rec['class_name']}, embedded configuration), no weights loaded")
        a.size = a.size or rec["native_size"]
    elif embedded:  # the real architecture from the embedded configuration, on the meta device
        unet = standins.meta_unet(embedded)
        factor = 2 ** (len(standins.config(embedded, "vae")["block_out_channels"]) - 1)
        text_len = standins.config(embedded, "text_encoder")["max_position_embeddings"]
        print(f"# {a.model}: the real architecture (embedded configuration), no weights loaded")
    else:
        from . import denoisers

        pipe = load(a.model)
        unet, factor, text_len = denoisers.denoiser(pipe), vae_scale_factor(pipe), denoisers.text_len(pipe)
        a.size = a.size or denoisers.native_size(pipe, factor)
    size = a.size or unet.config.sample_size * factor
    if size % factor:
        raise DifstudyError(f"image size {size} is not a multiple of the VAE factor {factor}")
    cat = Catalog(unet, latent_size=size // factor, text_len=text_len)
    names = cat.resolve(a.only) if a.only else cat.names
    if a.long:
        df = cat.to_frame()
        df = df[df["name"].isin(names)]
        with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 80):
            print(df.to_string())
    else:
        print("\n".join(names))


def _toyworld(a) -> None:
    from .data.export import export_all

    export_all(a.out, n=a.n, size=a.size, seed=a.seed, n_pairs=a.pairs if a.pairs is not None else a.n)


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as YAML (``3``, ``None``/``null``, ``[64, 32]``, ``conv``)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    parsed = None if value in ("None", "none") else yaml.safe_load(value)
    return key.replace("-", "_"), parsed


def _probe_real(a) -> None:
    from . import protocols as P
    from . import real
    from .fileio import write_csv_atomic

    cfg = real.task_config(a.dataset, dict(a.option))
    ex = P.ExtractionConfig(t=a.t, variant=a.variant, image_size=a.size, batch_size=a.batch, cache_dir=a.cache)
    source = real.feature_source(a.model, a.acts, ex, dtype=a.dtype, device=a.device)
    df = real.probe_real(a.dataset, a.root, source, cfg, a.seeds, a.n_train, a.n, a.num_classes)
    df = df.assign(model=a.model if a.acts != ["pixels"] else "pixels", t=a.t)
    print(f"protocol: {df['protocol'].iloc[0]}")
    print(P.summarize(df, ("task", "metric")).to_string(index=False))
    if a.out:
        write_csv_atomic(df, a.out)


def _add_probe_real(sub) -> None:
    from .real import TASK_KINDS

    p = sub.add_parser(
        "probe-real",
        help="a paper protocol on a dataset in its official layout (SPair-71k, DDPM-seg, ADE20K, Cityscapes, CIFAR-10)",
    )
    p.add_argument("dataset", choices=list(TASK_KINDS))
    p.add_argument("--root", required=True)
    p.add_argument("--model", default="sd15")
    p.add_argument("--acts", nargs="+", default=["ours-v1.5"], help="activations, named sets, or 'pixels'")
    p.add_argument("--t", type=int, default=50)
    p.add_argument("--variant", default="empty", help="empty, generic, fine or text:<prompt>")
    p.add_argument("--size", type=int, default=None, help="image size for extraction (default: the model's native)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="run seeds (noise draw, probe init, order)")
    p.add_argument("--n", type=int, default=None, help="test pairs / images (default: all)")
    p.add_argument("--n-train", type=int, default=None, help="training images (or conv-head pairs; default: all)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of a generic ddpmseg folder")
    p.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of the task's protocol config, e.g. method=conv, n_models=3, concat_size=None (repeatable)",
    )
    p.add_argument("--batch", type=int, default=8, help="extraction batch size")
    p.add_argument("--cache", default="cache/features")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="CSV of the tidy results")
    p.set_defaults(fn=_probe_real)


def _extract(a) -> None:
    import torch

    from .data.loaders import load_dataset
    from .extract import extract
    from .scaleout import Shard, local_device

    shard = Shard.parse(a.shard)  # before loading anything: a bad spec fails at once
    device = a.device or (local_device() if a.shard == "auto" else None)
    if a.dataset.startswith("toyworld"):
        from .data.toyworld import ToyWorld

        split = a.dataset.split(":", 1)[1] if ":" in a.dataset else "test"
        ds = ToyWorld(split, n=a.n, size=a.toy_size)
    else:
        kind, _, root = a.dataset.partition(":")
        ds = load_dataset(kind, root)
        if a.n:
            ds = [ds[i] for i in range(min(a.n, len(ds)))]
    from .denoisers import family
    from .models import load

    pipe = load(a.model, dtype=a.dtype, device=device)
    acts = a.acts or (["ours-v1.5"] if family(pipe) == "unet" else ["all"])
    flow_steps = a.flow_steps if a.flow_steps in (None, "default", "continuous") else int(a.flow_steps)
    extract(
        pipe,
        ds,
        acts,
        model_name=a.model,
        flow_steps=flow_steps,
        guidance=a.guidance,
        timesteps=a.t,
        variants=a.variants,
        seed=a.seed,
        image_size=a.size,
        batch_size=a.batch,
        cache_dir=a.cache,
        store_dtype=torch.float16 if a.store == "fp16" else torch.float32,
        shard=shard,
        dataset_name=a.dataset,
    )


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="extract activations of a dataset into the feature cache")
    p.add_argument("--model", default="mini")
    p.add_argument(
        "--dataset",
        default="toyworld:test",
        help="toyworld[:split] or KIND:ROOT (spair, horse21, ade20k, cityscapes, cifar10...)",
    )
    p.add_argument(
        "--n-images",
        "--n",
        dest="n",
        type=int,
        default=None,
        help="number of images (default: all); under torchrun write --n-images (torchrun reads --n as its own option)",
    )
    p.add_argument("--toy-size", type=int, default=64)
    p.add_argument(
        "--acts",
        nargs="+",
        default=None,
        help="paper names, module paths or sets (ours-v1.5, legacy-v1.5, ours-xl, legacy-xl, all); "
        "default: ours-v1.5 for a U-Net, all for a diffusion transformer",
    )
    p.add_argument("--t", nargs="+", type=int, default=[50])
    p.add_argument(
        "--flow-steps",
        default="default",
        help="SD3 / FLUX: the Img2Img grid t is put on (default: FLUX's official 28 steps, SD3 continuous), "
        "an integer, or 'continuous' (sigma from t / 1000)",
    )
    p.add_argument("--guidance", type=float, default=None, help="FLUX-dev's guidance embedding (official: 1.0)")
    p.add_argument("--variants", nargs="+", default=["empty"], help="empty, generic, fine or text:<prompt>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's native size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache", default="cache/features")
    p.add_argument("--dtype", default=None, help="model dtype: fp32, fp16, bf16")
    p.add_argument("--device", default=None)
    p.add_argument("--store", choices=["fp16", "fp32"], default="fp16")
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N|auto",
        help="compute batches I, I+N, I+2N... only (N workers on one cache = one run); "
        "auto: the process's rank under accelerate launch / torchrun / srun",
    )
    p.set_defaults(fn=_extract)


def _cache_verify(a) -> None:
    import pandas as pd

    from .cache import verify_cache

    report = verify_cache(a.cache_dir, repair=a.repair)
    c = report.completeness
    if c.empty:
        print(f"[difstudy cache] {a.cache_dir}: no entries")
    else:
        c = c.assign(missing=(c["expected"] - c["present"]).clip(lower=0), request=c["request"].str[:8])
        with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 60):
            print(c.drop(columns=["group"]).to_string(index=False))
        state = "complete" if report.complete else f"incomplete: {int(c['missing'].sum())} entries missing"
        print(f"[difstudy cache] {len(c)} activation/t/variant rows, {state}")
    if report.duplicates:
        print(f"[difstudy cache] {report.duplicates} entries are stored twice (harmless: one copy is read)")
    if report.corrupt.empty:
        print("[difstudy cache] no corrupt entries")
        return
    with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 100):
        print(report.corrupt.to_string(index=False))
    n = int(report.corrupt["entries"].sum())
    if report.repaired:
        print(
            f"[difstudy cache] repaired {len(report.corrupt)} shard(s) ({n} entries); rerun extract to recompute them"
        )
    else:
        print(
            f"[difstudy cache] {len(report.corrupt)} corrupt shard(s) ({n} entries); run with --repair", file=sys.stderr
        )
        sys.exit(1)


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="inspect a feature cache")
    csub = p.add_subparsers(dest="cache_cmd", required=True)
    v = csub.add_parser(
        "verify", help="completeness per activation/t/variant and corrupt entries (exit 1 if corrupt, unrepaired)"
    )
    v.add_argument("cache_dir", help="the --cache folder of difstudy extract, or one group folder in it")
    v.add_argument(
        "--repair", action="store_true", help="quarantine corrupt shards so that a rerun of extract recomputes them"
    )
    v.set_defaults(fn=_cache_verify)


def _bench(a) -> None:
    from .bench import config_for, run_bench

    cfg = config_for(a.quick, device=a.device, dtype=a.dtype)
    cfg.threads = a.threads
    if a.repeats:
        cfg.repeats = a.repeats
    run_bench(cfg, out=a.out)
    sys.stdout.flush()


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time capture, early stop, batching and extraction memory (CPU or CUDA)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and a lighter comparison (< 1 min)")
    p.add_argument("--out", default=None, help="write the tidy result rows to this CSV file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed for the whole run; default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, --quick 3; cuda 10)")
    p.add_argument(
        "--device", default="cpu", help="where the timed U-Net runs: cpu (default) or cuda[:i] (SD1.5 widths at 512 px)"
    )
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: fp32 on cpu, fp16 on cuda")
    p.set_defaults(fn=_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difstudy", description="diffusion U-Net activations as discriminative features")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser(
        "catalog", help="list a U-Net's or diffusion transformer's activations under the papers' names (forward order)"
    )
    c.add_argument(
        "model",
        help="mini, tiny-sd15, tiny-sd21, tiny-sdxl, an alias (sd15, sdxl...), hub id or folder; transformers: "
        "pixart-alpha, pixart-sigma, sd3-medium, sd35-large, flux-dev, flux-schnell, tiny-pixart, tiny-sd3, tiny-flux",
    )
    c.add_argument("--long", action="store_true", help="table with module path, kind, level, shape")
    c.add_argument("--size", type=int, default=None, help="image size in pixels for the shapes (default: native)")
    c.add_argument("--only", nargs="+", default=None, help="names, named sets (ours-v1.5...) or module paths")
    c.set_defaults(fn=_catalog)

    t = sub.add_parser("toyworld", help="write the toy world in SPair-71k, DDPM-seg and class-folder formats")
    t.add_argument("--out", required=True)
    t.add_argument("--n", type=int, default=200, help="images per split")
    t.add_argument("--size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--pairs", type=int, default=None, help="correspondence pairs per split (default: n)")
    t.set_defaults(fn=_toyworld)

    _add_probe_real(sub)
    _add_extract(sub)
    _add_cache(sub)

    from . import bookcheck, lab, report, study, sweep
    from .data import prepare

    for module in (study, sweep, report, lab, prepare):
        module.add_cli(sub)
    _add_bench(sub)
    bookcheck.add_cli(sub)
    return p


def main(argv=None) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "requires torchvision" notices on import
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (DifstudyError, ValueError) as e:
        print(f"difstudy {args.cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # e.g. `difstudy catalog sdxl | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
