#!/usr/bin/env python
"""Drop-in for diffusers' examples/textual_inversion/textual_inversion_sdxl.py.

    accelerate launch textual_inversion_sdxl.py --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
        --train_data_dir=DIR --placeholder_token="<cat-toy>" --initializer_token="toy" --resolution=1024 ...

Every flag of diffusers' SDXL script, with its name and default, is a flag of the shared CLI, so its
command lines run unchanged. It is textual_inversion.py, which recognises an SDXL pipeline by itself;
unlike diffusers' script it trains both text encoders' vectors and writes learned_embeds.safetensors
(text_encoder) and learned_embeds_2.safetensors (text_encoder_2).
"""

import sys

from textual_inversion import main
from textual_inversion_core.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: main(argv, prog="textual_inversion_sdxl.py")))
