"""Train a LoRA that adapts a difstudy pipeline (the mini model by default) to a toy-world
sub-domain it never saw, on CPU::

    python -m difstudy.train.lora --model mini --background checkered --out runs/lora \\
        --export difstudy/models/difstudy-mini-lora-checkered

The GATE LoRA technique adapts the model to the dataset's domain. The mini U-Net is trained
without the ``checkered`` background (``difstudy.train.mini --holdout-background``), so this
LoRA learns exactly that sub-domain:

1. ``data``: render ``--n-train`` toy-world training images whose background is
   ``--background`` and tokenise their captions.
2. ``latents``: VAE posterior means and stds, computed once.
3. ``lora``: a peft LoRA (rank ``--rank``, alpha = rank, Gaussian init) on the U-Net's attention
   projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (``unet.add_adapter``); the base
   weights, VAE and text encoder are frozen; loss: MSE to the base model's prediction target
   (epsilon, v or sample); captions fine (60%), generic (30%) or empty (10%).
4. ``export``: ``StableDiffusionPipeline.save_lora_weights`` (diffusers/peft format,
   ``pytorch_lora_weights.safetensors``), loadable with ``pipe.load_lora_weights(folder)`` and
   :func:`difstudy.gate.load_lora`, with ``training_log.csv`` and ``difstudy_training.json`` (the
   options, and ``base_fingerprint`` of the base U-Net, :func:`difstudy.gate.techniques.base_record`:
   :func:`difstudy.gate.load_lora` refuses the LoRA on another U-Net).

Checkpoints (LoRA weights, optimiser, RNG, step) are written atomically to ``--out/lora.pt``
every ``--ckpt-every`` steps, so a killed run resumes; losses go to ``--out/log.csv``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import LORA_TARGET_MODULES as TARGET_MODULES
from ..models import lora_config, write_training_record
from .common import (
    CsvLog,
    atomic_save,
    cosine_lr,
    diffusion_target,
    encode_latents,
    noisy_batch,
    toy_data,
    training_device,
)

ADAPTER = "default"


def lora_state(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA layout (what ``save_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))


def save_lora(pipe, folder: Path) -> None:
    """Write the U-Net's LoRA in diffusers/peft format (``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora_state(pipe.unet), safe_serialization=True)


def train(
    pipe,
    out: Path,
    steps: int,
    batch: int = 32,
    lr: float = 1e-3,
    rank: int = 8,
    n_train: int = 1000,
    background: str = "checkered",
    seed: int = 0,
    ckpt_every: int = 200,
    log: CsvLog | None = None,
):
    """Train (or resume) the LoRA in ``out``; it stays attached to ``pipe.unet`` (adapter
    ``default``), which is returned in eval mode."""
    from diffusers import DDPMScheduler
    from peft.utils import set_peft_model_state_dict

    from ..models import vae_scale_factor

    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        raise ValueError("difstudy.train.lora trains SD1.x/2.x-layout pipelines; SDXL needs its two text encoders")
    out.mkdir(parents=True, exist_ok=True)
    log = log or CsvLog(out / "log.csv")
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe)
    data = toy_data(out, n_train, seed, size, pipe.tokenizer, background=background)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    lat = encode_latents(out, pipe.vae, data["images"])
    scaling = pipe.vae.config.scaling_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(lora_config(rank), adapter_name=ADAPTER)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    ckpt = out / "lora.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")  # the generator state stays on the CPU
        set_peft_model_state_dict(pipe.unet, st["lora"], adapter_name=ADAPTER)
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]
        log.resumed("lora", step)
    dev = pipe.unet.device
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc="lora", mininterval=10)
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        b = noisy_batch(data, lat, scaling, sched, batch, gen, dev)
        with torch.no_grad():
            ehs = pipe.text_encoder(b["ids"])[0]
        pred = pipe.unet(b["zt"], b["t"], ehs).sample
        loss = F.mse_loss(pred.float(), diffusion_target(sched, b["z0"], b["noise"], b["t"]).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        log("lora", step, loss.item(), opt.param_groups[0]["lr"], time.time() - t0)
        if step % ckpt_every == 0 or step == steps:
            from peft.utils import get_peft_model_state_dict

            state = dict(lora=get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER), opt=opt.state_dict())
            atomic_save(dict(state, gen=gen.get_state(), step=step), ckpt)
    bar.close()
    pipe.unet.eval()
    return pipe


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m difstudy.train.lora", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mini", help="base pipeline for difstudy.models.load (default: mini)")
    ap.add_argument("--out", type=Path, default=Path("runs/lora"), help="run folder (checkpoint, log.csv)")
    ap.add_argument("--export", type=Path, default=None, help="write the LoRA folder here at the end")
    ap.add_argument("--background", default="checkered", help="toy-world background of the sub-domain")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--device", default="cpu", help="where to train: cpu (default) or cuda[:N]; batches are drawn on the CPU"
    )
    a = ap.parse_args(argv)
    dev = training_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ..gate.techniques import base_record
    from ..models import load

    t_start = time.time()
    pipe = load(a.model)
    base = base_record(pipe.unet)  # on the CPU; before train() adds the adapter (peft layers change the fingerprint)
    pipe.to(dev)
    a.out.mkdir(parents=True, exist_ok=True)
    log = CsvLog(a.out / "log.csv")
    train(pipe, a.out, a.steps, a.batch, a.lr, a.rank, a.n_train, a.background, a.seed, a.ckpt_every, log)
    log.close()
    if a.export:
        save_lora(pipe.to("cpu"), a.export)
        shutil.copyfile(a.out / "log.csv", a.export / "training_log.csv")
        meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
        meta["target_modules"] = list(TARGET_MODULES)
        meta["wall_seconds_this_invocation"] = round(time.time() - t_start, 1)
        meta.update(base)
        write_training_record(a.export, meta)
        print(f"exported LoRA to {a.export}")


if __name__ == "__main__":
    main()
