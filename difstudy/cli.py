"""Command line: ``difstudy SUBCOMMAND`` (or ``python -m difstudy SUBCOMMAND``)."""

from __future__ import annotations

import argparse
import sys

from .errors import DifstudyError


def _catalog(a) -> None:
    import pandas as pd

    from .catalog import Catalog
    from .models import load, vae_scale_factor

    pipe = load(a.model)
    size = a.size or pipe.unet.config.sample_size * vae_scale_factor(pipe)
    factor = vae_scale_factor(pipe)
    if size % factor:
        raise DifstudyError(f"image size {size} is not a multiple of the VAE factor {factor}")
    cat = Catalog(pipe.unet, latent_size=size // factor, text_len=pipe.tokenizer.model_max_length)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difstudy", description="diffusion U-Net activations as discriminative features")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("catalog", help="list a U-Net's activations under the papers' names (forward order)")
    c.add_argument("model", help="mini, tiny-sd15, tiny-sd21, tiny-sdxl, an alias (sd15, sdxl...), hub id or folder")
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

    from . import bench, extract, real, study

    for module in (extract, study, real, bench):
        module.add_cli(sub)
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
