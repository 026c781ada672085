"""Training scripts for the models difstudy makes itself (study layer: they
use the toy world; :mod:`difstudy.models` only defines architectures and loads).

- :mod:`difstudy.train.mini`: the ``difstudy-mini`` pipeline (VAE, text encoder, U-Net);
- :mod:`difstudy.train.judge`: the toy-world classifier that judges generated samples.
- :mod:`difstudy.train.controlnet`: a canny-edge ControlNet for a pipeline (GATE technique);
- :mod:`difstudy.train.lora`: a LoRA adapting a pipeline to a held-out toy-world background (GATE technique);
- :mod:`difstudy.train.common`: checkpoints, log and data helpers of the GATE scripts.
"""
