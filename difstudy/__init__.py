"""difstudy: diffusion U-Net activations as discriminative features.

Main entry points:

- :func:`difstudy.models.load` - pipelines (built-in mini/tiny models, hub ids, folders)
- :class:`difstudy.catalog.Catalog` - every activation under the papers' names
- :class:`difstudy.capture.Capture` / :func:`difstudy.capture.run_with_cache` - read activations
- :mod:`difstudy.extract` - datasets to an out-of-core feature cache
- :mod:`difstudy.probes` - correspondence, segmentation and classification probes
"""

import os

# transformers prints an info notice per image processor when torchvision is
# absent (difstudy never uses them); keep warnings and errors only, unless the
# user chose a verbosity.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
