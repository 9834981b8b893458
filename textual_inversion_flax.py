#!/usr/bin/env python
"""Textual Inversion for Stable Diffusion with JAX/Flax (one host with many devices, or a TPU pod).

    python textual_inversion_flax.py --pretrained_model_name_or_path=MODEL \
        --train_data_dir=DIR --placeholder_token="<cat-toy>" --initializer_token="toy" ...

The twin of textual_inversion.py: the same flags (one shared argparse definition), the same data
order, the same output files and the same checkpoint format (a checkpoint written by one trainer
resumes in the other). Reads top to bottom: parse -> load -> prepare -> loop -> save.

Only the placeholder vectors are differentiated: they are the one argument of the gradient, and are
written into the token-embedding lookup's output, so neither the 49408-row matrix nor any other
weight gets a gradient. The train step is pure and pmapped over every device (each host feeds its
jax.local_devices()); gradients are pmean-ed across all of them. Every random draw of an example comes from (seed, global example index), so a run on 2
devices equals a run on 1 device with the same global batch, and a resumed run the uninterrupted one.
"""

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import warnings

import numpy as np

from textual_inversion_core import checkpoints, embeddings, hub, outputs, plots
from textual_inversion_core.cli import parse_args, public_config
from textual_inversion_core.data import STREAM_NOISE, example_seed
from textual_inversion_core.errors import UserError, run_cli
from textual_inversion_core.preflight import fit_init_vectors, load_run_inputs
from textual_inversion_core.schedules import lr_table

logger = logging.getLogger("textual_inversion_flax")

COMPONENTS = ("text_encoder", "vae", "unet")
# Buffers some PyTorch checkpoints carry that are not parameters in Flax (recomputed there).
_PT_BUFFER_SUFFIXES = ("position_ids", "num_batches_tracked")
_SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# --------------------------------------------------------------------------------------------------
# Flags: the shared parser carries some PyTorch-only flags; each is honoured here or refused.


def check_flags(args):
    if args.mixed_precision == "fp16":
        raise UserError("--mixed_precision fp16 is not supported by the Flax trainer (no loss scaling in JAX); "
                        "use --mixed_precision bf16, which needs none")
    if args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing is not available in the Flax trainer (diffusers' Flax UNet has no "
                        "rematerialisation); drop the flag and lower --train_batch_size, or use textual_inversion.py")
    if args.local_rank != -1:
        raise UserError(f"--local_rank {args.local_rank} (or LOCAL_RANK) is set by torch launchers; run the Flax trainer "
                        "with plain `python` (JAX finds its devices; for several hosts set JAX_COORDINATOR_ADDRESS)")
    if args.report_to in ("comet_ml",):
        raise UserError("--report_to comet_ml is not supported by the Flax trainer; use tensorboard, wandb or none")
    import importlib.util

    wanted = {"all": ["tensorboard", "wandb"], "none": []}.get(args.report_to, [args.report_to])
    for module in wanted:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--report_to {args.report_to} needs the {module} package; "
                            f"pip install {module} or pass --report_to none")


# --------------------------------------------------------------------------------------------------
# Loading: Flax (flax_model.msgpack) or PyTorch (.safetensors / .bin) weights, converted here and
# checked key by key, so nothing is ever left at its random initialisation.


def resolve_model_folder(args):
    """A local pipeline folder for --pretrained_model_name_or_path (of a hub id, only the files used are fetched)."""
    model = args.pretrained_model_name_or_path
    if os.path.exists(model):
        if not os.path.isdir(model) or not (os.path.isfile(os.path.join(model, "model_index.json"))
                                            or os.path.isdir(os.path.join(model, "unet"))):
            raise UserError(f"--pretrained_model_name_or_path {model!r} is not a Stable Diffusion pipeline folder "
                            "(no model_index.json or unet/); point it at the folder that holds unet/, vae/, text_encoder/")
        return model
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(model, revision=args.revision, token=args.hub_token)
        patterns = ["model_index.json", "tokenizer/*", "scheduler/*"]
        for component in COMPONENTS:
            patterns.append(f"{component}/config.json")
            names = {f.split("/", 1)[1] for f in files if f.startswith(component + "/")}
            choice = _weight_choice(names, args.variant)
            if choice:  # else: the local check below names what is missing
                patterns += [f"{component}/{name}" for name in choice[1]]
                if choice[0] == "safetensors-index":
                    stem = choice[1][0].split(".")[0]
                    patterns.append(f"{component}/{stem}-*.safetensors")
        return snapshot_download(model, revision=args.revision, token=args.hub_token, allow_patterns=patterns)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model {model!r} ({first}); check the path or hub id and --revision") from err


def _weight_choice(names, variant):
    """(kind, [file names]) of the weights to use among a component folder's files, or None.
    Flax weights first (no conversion), then safetensors (single or sharded), then .bin."""
    infix = f".{variant}" if variant else ""
    for stem in ("diffusion_flax_model", "flax_model"):  # diffusers' and transformers' names
        if f"{stem}{infix}.msgpack" in names:
            return "flax", [f"{stem}{infix}.msgpack"]
    for stem in ("diffusion_pytorch_model", "model"):
        if f"{stem}{infix}.safetensors" in names:
            return "safetensors", [f"{stem}{infix}.safetensors"]
        if f"{stem}{infix}.safetensors.index.json" in names:
            return "safetensors-index", [f"{stem}{infix}.safetensors.index.json"]
    for stem in ("diffusion_pytorch_model", "pytorch_model"):
        if f"{stem}{infix}.bin" in names:
            return "bin", [f"{stem}{infix}.bin"]
    return None


def _weight_file(folder, variant):
    """(kind, path or [paths]) of the weights in a local component folder."""
    choice = _weight_choice(set(os.listdir(folder)) if os.path.isdir(folder) else set(), variant)
    if choice is None:
        hint = f" with --variant {variant}" if variant else ""
        raise UserError(f"no weights{hint} in {folder!r} (looked for *flax_model.msgpack, *.safetensors, *.bin); "
                        "check the model folder" + (" and --variant" if variant else ""))
    kind, names = choice
    if kind == "flax":
        return kind, os.path.join(folder, names[0])
    if kind == "safetensors-index":
        with open(os.path.join(folder, names[0]), encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return "safetensors", [os.path.join(folder, s) for s in shards]
    return kind, [os.path.join(folder, names[0])]


def read_pytorch_state(paths, kind):
    """{name: float32 numpy array} of PyTorch checkpoint files (.bin read with weights_only=True)."""
    state = {}
    for path in paths:
        if kind == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(path, framework="numpy") as f:
                    for key in f.keys():
                        state[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
            except (TypeError, ValueError):  # bf16 has no numpy dtype: go through torch
                from safetensors.torch import load_file

                state.update({k: v.float().numpy() for k, v in load_file(path).items()})
        else:
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state.update({k: v.float().numpy() for k, v in loaded.items() if hasattr(v, "float")})
    return state


def convert_pytorch_state(pt_state, expected, library):
    """PyTorch names/layouts -> a flat {flax key tuple: array} using diffusers'/transformers' rules.

    `expected` is the flat {key: ShapeDtypeStruct} of the Flax model (from jax.eval_shape, so no
    random weights are ever materialised). Returns (converted, unexpected PyTorch names).
    """
    if library == "transformers":
        from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

        def convert(name, tensor):
            return rename_key_and_reshape_tensor(tuple(name.split(".")), tensor, expected, "")
    else:
        from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

        def convert(name, tensor):
            return rename_key_and_reshape_tensor(tuple(rename_key(name).split(".")), tensor, expected)

    converted, unexpected = {}, []
    for name, tensor in pt_state.items():
        key, value = convert(name, tensor)
        if key in expected:
            converted[key] = np.ascontiguousarray(value)
        elif not name.endswith(_PT_BUFFER_SUFFIXES):
            unexpected.append(name)
    return converted, unexpected


def _add_text_model_prefix_if_missing(pt_state, expected):
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix that the Flax model uses."""
    wants_prefix = all(k[0] == "text_model" for k in expected)
    if wants_prefix and pt_state and not any(k.startswith("text_model.") for k in pt_state):
        return {"text_model." + k: v for k, v in pt_state.items()}, True
    return pt_state, False


def verify_params(flat, expected, where):
    """Every Flax parameter must have come from the checkpoint, with the right shape."""
    missing = [k for k in expected if k not in flat]
    if missing:
        names = ", ".join("/".join(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{where}: {len(missing)} of {len(expected)} parameters are not in the checkpoint "
                        f"({names}{more}); they would be random. Re-save the model with a matching diffusers/"
                        "transformers version or point --pretrained_model_name_or_path at a complete pipeline")
    for key, spec in expected.items():
        if tuple(flat[key].shape) != tuple(spec.shape):
            raise UserError(f"{where}: parameter {'/'.join(key)} has shape {tuple(flat[key].shape)} in the checkpoint, "
                            f"the model config needs {tuple(spec.shape)}; the config and weights do not match")


def load_component(folder, name, variant, dtype, config_overrides=None):
    """(flax model, params as a nested dict of numpy float32 arrays, source description).

    config_overrides: module options that change how the model computes, not its weights."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    sub = os.path.join(folder, name)
    if not os.path.isdir(sub):
        raise UserError(f"{folder!r} has no {name}/ folder; --pretrained_model_name_or_path must be a full SD pipeline")
    rng = jax.random.PRNGKey(0)
    if name == "text_encoder":
        from transformers import CLIPTextConfig, FlaxCLIPTextModel

        config = CLIPTextConfig.from_pretrained(sub)
        model = FlaxCLIPTextModel(config, dtype=dtype, _do_init=False)
        library = "transformers"
        shapes = jax.eval_shape(lambda r: model.init_weights(r, model.input_shape), rng)
    else:
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

        cls = FlaxUNet2DConditionModel if name == "unet" else FlaxAutoencoderKL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_config(cls.load_config(sub), dtype=dtype, **(config_overrides or {}))
        library = "diffusers"
        shapes = jax.eval_shape(model.init_weights, rng)
    expected = flatten_dict(shapes)
    kind, paths = _weight_file(sub, variant)
    where = f"{name} ({os.path.basename(paths if isinstance(paths, str) else paths[0])})"
    if kind == "flax":
        from flax.serialization import msgpack_restore

        with open(paths, "rb") as f:
            flat = {k: np.asarray(v, dtype=np.float32) for k, v in flatten_dict(msgpack_restore(f.read())).items()}
        extra = ["/".join(k) for k in flat if k not in expected]
        if extra:
            logger.warning("%s: %d stored arrays are not parameters of the model and are ignored (e.g. %s)",
                           where, len(extra), ", ".join(extra[:3]))
        flat = {k: v for k, v in flat.items() if k in expected}
        note = "Flax weights"
    else:
        pt_state = read_pytorch_state(paths, kind)
        renamed = False
        if library == "transformers":
            pt_state, renamed = _add_text_model_prefix_if_missing(pt_state, expected)
        flat, unexpected = convert_pytorch_state(pt_state, expected, library)
        if unexpected:
            # Weights the Flax architecture has no place for: it would be a different model.
            raise UserError(f"{where}: {len(unexpected)} checkpoint tensors have no place in the Flax model "
                            f"({', '.join(unexpected[:5])}); this architecture is not supported by diffusers' Flax "
                            "models, use textual_inversion.py")
        note = f"PyTorch {kind} converted" + (" (transformers-5 layout, text_model. prefix added)" if renamed else "")
    verify_params(flat, expected, where)
    return model, unflatten_dict(flat), note


def noise_schedule(folder):
    """FlaxDDPMScheduler and its state from the model's own scheduler_config.json."""
    from diffusers import FlaxDDPMScheduler

    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise UserError(f"{folder!r} has no scheduler/scheduler_config.json; the noise schedule must come from the model")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"the model's scheduler predicts {prediction_type!r}; only epsilon and v_prediction are supported")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in _SUPPORTED_BETA_SCHEDULES:
        raise UserError(f"beta_schedule {config.get('beta_schedule')!r} in {path!r} is not available in Flax "
                        f"(supported: {', '.join(_SUPPORTED_BETA_SCHEDULES)}); use textual_inversion.py for this model")
    if config.get("rescale_betas_zero_snr"):
        raise UserError(f"{path!r} asks for rescale_betas_zero_snr, which diffusers' Flax schedulers do not implement; "
                        "use textual_inversion.py for this model")
    train_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    scheduler = FlaxDDPMScheduler(**{k: config[k] for k in train_keys if k in config})
    return scheduler, scheduler.create_state(), config


def load_models(args, folder, weight_dtype):
    import jax.numpy as jnp
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_name or os.path.join(folder, "tokenizer"),
                                                  revision=args.revision if args.tokenizer_name else None)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the tokenizer ({first}); check --pretrained_model_name_or_path / --tokenizer_name") from err
    noise_scheduler, scheduler_state, scheduler_config = noise_schedule(folder)
    loaded = {}
    overrides = {}
    if args.enable_xformers_memory_efficient_attention:
        # xFormers is PyTorch-only; the JAX counterpart is diffusers' chunked attention, which computes the
        # same softmax in query/key blocks and recomputes them in the backward instead of keeping each
        # [heads, tokens, tokens] matrix alive (SD-1.5 at 512 px: 0.54 GB per self-attention layer in fp32).
        overrides["unet"] = {"use_memory_efficient_attention": True}
    for name in COMPONENTS:
        # The VAE stays fp32: its posterior is computed once per image and cached exactly.
        dtype = jnp.float32 if name == "vae" else weight_dtype
        try:
            loaded[name] = load_component(folder, name, args.variant, dtype, overrides.get(name))
        except UserError:
            raise
        except Exception as err:  # unreadable/corrupt files of any library: one line, not a traceback
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load {name} from {folder!r} ({first}); check the model folder") from err
        logger.info("%s: %s", name, loaded[name][2])
    return tokenizer, noise_scheduler, scheduler_state, scheduler_config, loaded


# --------------------------------------------------------------------------------------------------
# The objective. Shared with the parity test, which feeds it the PyTorch loss's exact inputs.


def placeholder_interceptor(placeholder_ids, vectors):
    """Flax method interceptor: the token-embedding lookup returns `vectors` for the placeholder ids.

    A one-hot product (exact: one 1.0 per row) selects the vector, as in the PyTorch script, so the
    gradient flows into `vectors` only; the frozen matrix is a constant of the computation.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    ids = jnp.asarray(placeholder_ids, dtype=jnp.int32)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Embed) \
                and context.module.name == "token_embedding":
            match = args[0][..., None] == ids
            picked = match.astype(vectors.dtype) @ vectors
            out = jnp.where(match.any(-1, keepdims=True), picked.astype(out.dtype), out)
        return out

    return interceptor


def exact_gelu_interceptor(next_fun, args, kwargs, context):
    """diffusers' Flax GEGLU uses the tanh approximation of GELU; the PyTorch UNet (which the weights
    were trained with) uses the exact erf form. Run the exact one, so both trainers optimise the
    same function (dropout is 0 and off: the UNet is frozen and deterministic)."""
    if context.method_name == "__call__" and type(context.module).__name__ == "FlaxGEGLU":
        import jax
        import jax.numpy as jnp

        hidden_linear, hidden_gate = jnp.split(context.module.proj(args[0]), 2, axis=2)
        return hidden_linear * jax.nn.gelu(hidden_gate, approximate=False)
    return next_fun(*args, **kwargs)


def make_denoising_loss(text_encoder, unet, noise_scheduler, placeholder_ids, weight_dtype):
    """loss(vectors, params, scheduler_state, latents, noise, timesteps, input_ids) -> scalar fp32.

    params = {"text_encoder": ..., "unet": ...}. MSE between the UNet's prediction and the target
    (noise for epsilon models, velocity for v_prediction models), as textual_inversion.denoising_loss.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"

    def loss(vectors, params, scheduler_state, latents, noise, timesteps, input_ids):
        with nn.intercept_methods(placeholder_interceptor(placeholder_ids, vectors)):
            hidden = text_encoder(input_ids, params=params["text_encoder"])[0]
        noisy = noise_scheduler.add_noise(scheduler_state, latents, noise, timesteps)
        with nn.intercept_methods(exact_gelu_interceptor):
            pred = unet.apply({"params": params["unet"]}, noisy.astype(weight_dtype), timesteps,
                              hidden.astype(weight_dtype)).sample
        target = noise_scheduler.get_velocity(scheduler_state, latents, noise, timesteps) if v_prediction else noise
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))

    return loss


def raw_prng_key(seed64):
    """The threefry key of a 64-bit seed ([high, low] words), as jax.random.PRNGKey gives with x64 on.

    Without x64, PRNGKey would keep only the low 32 bits; building the words here keeps all 64.
    """
    seed64 = int(seed64) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed64 >> 32, seed64 & 0xFFFFFFFF], dtype=np.uint32)


def draw_example_randomness(key, latent_shape, num_timesteps):
    """(posterior eps, noise, timestep) of one example from its own key."""
    import jax

    k_eps, k_noise, k_t = jax.random.split(key, 3)
    return (jax.random.normal(k_eps, latent_shape), jax.random.normal(k_noise, latent_shape),
            jax.random.randint(k_t, (), 0, num_timesteps))


def make_train_step(loss_fn, optimizer, scaling_factor, latent_shape, num_timesteps):
    """Pure step: (vectors, opt_state, frozen, scheduler_state, batch) -> (vectors, opt_state, loss).

    batch arrays are [accumulation, batch, ...]; gradients are averaged over micro-batches, then
    pmean-ed over devices ("batch" axis), which makes D devices x B equal one device x D*B.
    """
    import jax
    import jax.numpy as jnp
    import optax

    draw = jax.vmap(lambda k: draw_example_randomness(k, latent_shape, num_timesteps))

    def train_step(vectors, opt_state, frozen, scheduler_state, batch):
        def micro(carry, mb):
            grad_sum, loss_sum = carry
            eps, noise, timesteps = draw(mb["keys"])
            latents = (mb["mean"] + mb["std"] * eps) * scaling_factor
            loss, grad = jax.value_and_grad(loss_fn)(vectors, frozen, scheduler_state, latents, noise, timesteps,
                                                     mb["ids"])
            return (grad_sum + grad, loss_sum + loss), None

        (grad, loss), _ = jax.lax.scan(micro, (jnp.zeros_like(vectors), jnp.zeros((), jnp.float32)), batch)
        steps = batch["ids"].shape[0]
        grad = jax.lax.pmean(grad / steps, axis_name="batch")
        loss = jax.lax.pmean(loss / steps, axis_name="batch")
        updates, opt_state = optimizer.update(grad, opt_state, vectors)
        return optax.apply_updates(vectors, updates), opt_state, loss

    return train_step


def add_placeholder_rows(text_encoder, te_params, vocab_size, placeholder_ids, initializer_id, num_vectors,
                         init_vectors=None):
    """Grow the token-embedding matrix (in te_params, in place) to vocab_size rows; the placeholder
    rows start as the initializer token's row (or init_vectors). Returns the start vectors [n, dim]."""
    embeddings_params = te_params["text_model"]["embeddings"]["token_embedding"]
    table = np.asarray(embeddings_params["embedding"], np.float32)
    if init_vectors is not None:
        start = np.asarray(init_vectors, np.float32)
    else:
        start = np.repeat(table[initializer_id][None], num_vectors, axis=0)
    grown = np.zeros((vocab_size, table.shape[1]), np.float32)
    grown[: table.shape[0]] = table
    grown[placeholder_ids] = start
    embeddings_params["embedding"] = grown
    text_encoder.config.vocab_size = vocab_size  # the Flax Embed checks the matrix against the config
    return start


def merged_text_encoder_params(params, placeholder_ids, vectors, dtype=None):
    """Text-encoder params with the learned rows written into the token-embedding matrix."""
    import jax.numpy as jnp

    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    table = table.at[jnp.asarray(placeholder_ids)].set(jnp.asarray(vectors, dtype=table.dtype))
    merged = {**params, "text_model": {**params["text_model"], "embeddings": {
        **params["text_model"]["embeddings"], "token_embedding": {"embedding": table}}}}
    if dtype is not None:
        import jax

        merged = jax.tree.map(lambda x: x.astype(dtype), merged)
    return merged


# --------------------------------------------------------------------------------------------------
# Outputs


class Trackers:
    """TensorBoard (through torch's or tensorboardX's SummaryWriter) and/or wandb, on process 0."""

    def __init__(self, args, enabled):
        self.tensorboard, self.wandb = None, None
        if not enabled or args.report_to == "none":
            return
        config = {k: (",".join(v) if isinstance(v, list) else v) for k, v in public_config(args).items()}
        if args.report_to in ("tensorboard", "all"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=os.path.join(args.output_dir, args.logging_dir, "textual_inversion"))
            self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        if args.report_to in ("wandb", "all"):
            import wandb

            self.wandb = wandb.init(project="textual_inversion", config=config)

    def log(self, values, step):
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, images, step):
        if self.tensorboard is not None:
            self.tensorboard.add_images("validation", np.stack(images), step, dataformats="NHWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"validation": [wandb.Image(im) for im in images]}, step=step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def flax_scheduler_for(config, fallback="FlaxPNDMScheduler"):
    """The Flax twin of the model's scheduler class (PNDMScheduler -> FlaxPNDMScheduler)."""
    import diffusers

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name if name.startswith("Flax") else "Flax" + name, None) or getattr(diffusers, fallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(config)


def build_pipeline(models, tokenizer, scheduler):
    from diffusers import FlaxStableDiffusionPipeline

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # the no-safety-checker notice is expected here
    return FlaxStableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                       unet=models["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None)


class Validator:
    """Samples num_validation_images with the current vectors (25 DPM-Solver steps, as the PyTorch script).

    The sampling function is jitted once and reused by every validation round (the params are its
    arguments, so new vectors need no recompilation).
    """

    def __init__(self, args, models, tokenizer, scheduler_config):
        import jax
        import jax.numpy as jnp

        from diffusers import FlaxDPMSolverMultistepScheduler

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler = FlaxDPMSolverMultistepScheduler.from_config(scheduler_config)
        self.pipeline = build_pipeline(models, tokenizer, self.scheduler)
        self.args = args
        self.prompt_ids = jnp.asarray(self.pipeline.prepare_inputs([args.validation_prompt] * args.num_validation_images))
        self.generate = jax.jit(self.pipeline._generate, static_argnums=(3, 4, 5))

    def __call__(self, params, step, trackers):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        args = self.args
        params = dict(params, scheduler=self.scheduler.create_state())
        rng = jax.random.PRNGKey(args.seed or 0)
        with nn.intercept_methods(exact_gelu_interceptor):  # the UNet as trained, see exact_gelu_interceptor
            # guidance as a 0-d array: FlaxStableDiffusionPipeline broadcasts a list wrongly for batches > 1.
            images = self.generate(self.prompt_ids, params, rng, 25, args.resolution, args.resolution,
                                   jnp.asarray(7.5, jnp.float32))
        images = self.pipeline.numpy_to_pil(np.asarray(images))
        paths = plots.save_validation_images(args.output_dir, step, images)
        trackers.images([np.asarray(im) for im in images], step)
        return paths


def save_full_pipeline(args, output_dir, models, params, tokenizer, scheduler_config):
    """A FlaxStableDiffusionPipeline folder (fp32, extended tokenizer/text encoder); nothing downloaded."""
    import jax
    import jax.numpy as jnp

    from textual_inversion_core.hf_layout import move_into

    scheduler = flax_scheduler_for(scheduler_config)
    if getattr(models["unet"], "use_memory_efficient_attention", False):
        # How attention is computed is a runtime choice; the saved config stays the plain one.
        models = dict(models, unet=models["unet"].clone(use_memory_efficient_attention=False))
    pipeline = build_pipeline(models, tokenizer, scheduler)
    fp32 = {k: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), v) for k, v in params.items()}
    staging = os.path.join(output_dir, ".tmp-pipeline")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, params=fp32)
    move_into(staging, output_dir)


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    previous_handlers = {}
    try:
        return train(argv, previous_handlers)
    finally:  # an in-process caller (tests, notebooks) gets its own SIGINT/SIGTERM handling back
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def train(argv, previous_handlers):
    args = parse_args(argv, prog="textual_inversion_flax.py")

    # ---- Checks that need no model: fail in seconds, not after loading gigabytes.
    check_flags(args)
    dataset, resume_path, resume_tensors, resume_state, init_vectors = load_run_inputs(args)
    folder = resolve_model_folder(args)

    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # Several hosts: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the job.
        # CPU devices need gloo for cross-process collectives (accelerators have their own).
        jax.config.update("jax_cpu_collectives_implementation",
                          os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo"))
        jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
                                   process_id=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
    if args.allow_tf32:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    from textual_inversion import add_placeholder_tokens  # framework-free helper shared with the PyTorch script

    process, num_processes = jax.process_index(), jax.process_count()
    is_main = process == 0
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("diffusers", "transformers", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not is_main:
        logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
    hub_repo_id = hub.preflight(args) if args.push_to_hub and is_main else None

    # Seed: from the flag, the checkpoint being resumed, or drawn once and shared by every host.
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if resume_state is not None:
        if args.seed is not None and args.seed != resume_state["seed"]:
            logger.warning("--seed %s differs from the checkpoint's %s; using the checkpoint's", args.seed, resume_state["seed"])
        seed = int(resume_state["seed"])
    if num_processes > 1:
        from jax.experimental import multihost_utils

        seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
    args.seed = seed
    dataset.seed = seed

    # ---- Load
    weight_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    tokenizer, noise_scheduler, scheduler_state, scheduler_config, loaded = load_models(args, folder, weight_dtype)
    models = {name: loaded[name][0] for name in COMPONENTS}
    params = {name: loaded[name][1] for name in COMPONENTS}
    del loaded  # one host copy of the weights at a time: SD-sized models are gigabytes
    placeholder_ids, initializer_id = add_placeholder_tokens(
        tokenizer, args.placeholder_token, args.num_vectors, args.initializer_token)
    placeholder_string = " ".join(tokenizer.convert_ids_to_tokens(placeholder_ids))
    dataset.tokenize(tokenizer, placeholder_string)

    # ---- Prepare: the embedding matrix grows by the new rows (initialised like the PyTorch script).
    dim = params["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[1]
    init_vectors = fit_init_vectors(args, init_vectors, dim)
    start = add_placeholder_rows(models["text_encoder"], params["text_encoder"], len(tokenizer), placeholder_ids,
                                 initializer_id, args.num_vectors, init_vectors)
    frozen_host = {name: jax.tree.map(lambda x: np.asarray(x).astype(weight_dtype, copy=False), params[name])
                   for name in ("text_encoder", "unet")}
    vae_params = jax.tree.map(jnp.asarray, params["vae"])
    del params

    devices = jax.local_devices()
    num_local = len(devices)
    global_devices = jax.device_count()
    accumulation = args.gradient_accumulation_steps
    if args.scale_lr:
        args.learning_rate = args.learning_rate * args.train_batch_size * global_devices * accumulation
    global_batch = args.train_batch_size * global_devices
    steps_per_epoch = math.ceil(len(dataset) / (global_batch * accumulation))
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    validation_steps = args.validation_steps
    if args.validation_epochs is not None:
        validation_steps = args.validation_epochs * steps_per_epoch
    base_lr = args.learning_rate
    lrs = jnp.asarray(lr_table(args.lr_scheduler, args.lr_warmup_steps, max_train_steps, args.lr_num_cycles, base_lr),
                      dtype=jnp.float32)
    schedule = lambda count: lrs[jnp.minimum(count, max_train_steps)]  # noqa: E731
    optimizer = optax.adamw(schedule, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                            weight_decay=args.adam_weight_decay)
    vectors = jnp.asarray(start, jnp.float32)
    opt_state = optimizer.init(vectors)

    global_step = 0
    if resume_state is not None:
        if resume_state.get("num_vectors") != args.num_vectors or resume_tensors["vectors"].shape[1] != dim:
            raise UserError(f"checkpoint {resume_path!r} was made with other --num_vectors or another model; "
                            "resume with the original settings or start a new --output_dir")
        if resume_state.get("global_batch") != global_batch * accumulation:
            logger.warning("the checkpoint was trained with another global batch; the resumed run will not "
                           "match an uninterrupted one")
        vectors = jnp.asarray(resume_tensors["vectors"], jnp.float32)
        if "exp_avg" in resume_tensors:
            opt_state = optax.tree_utils.tree_set(
                optimizer.init(vectors), count=jnp.asarray(int(resume_state["optimizer_step"]), jnp.int32),
                mu=jnp.asarray(resume_tensors["exp_avg"], jnp.float32),
                nu=jnp.asarray(resume_tensors["exp_avg_sq"], jnp.float32))
        global_step = int(resume_state["step"])
        logger.info("resumed from %s at step %d", resume_path, global_step)

    def checkpoint_state(vectors_host, opt_state_host):
        tensors = {"vectors": np.asarray(vectors_host, np.float32)}
        adam = next(s for s in opt_state_host if isinstance(s, optax.ScaleByAdamState))
        count = int(adam.count)
        if count:  # the same names as the PyTorch AdamW state: checkpoints resume in either trainer
            tensors["exp_avg"] = np.asarray(adam.mu, np.float32)
            tensors["exp_avg_sq"] = np.asarray(adam.nu, np.float32)
        state = {"seed": seed, "num_vectors": args.num_vectors, "placeholder_token": args.placeholder_token,
                 "global_batch": global_batch * accumulation, "framework": "flax",
                 "optimizer_step": float(count), "learning_rate": args.learning_rate}
        return tensors, state

    trackers = Trackers(args, is_main)

    # Posterior (mean, std) per (image, flip), NCHW, filled on first use: no start-up stall.
    vae = models["vae"]
    scaling_factor = float(vae.config.scaling_factor)
    latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    latent_shape = (vae.config.latent_channels, latent_size, latent_size)
    num_timesteps = int(noise_scheduler.config.num_train_timesteps)
    encode = jax.jit(lambda p, x: _posterior(vae, p, x))
    latent_cache = {}

    def posterior(keys):
        for key in dict.fromkeys(keys):
            if key not in latent_cache:
                mean, std = encode(vae_params, jnp.asarray(dataset.pixels(*key)[None]))
                latent_cache[key] = (np.asarray(mean[0]), np.asarray(std[0]))
        return (np.stack([latent_cache[k][0] for k in keys]), np.stack([latent_cache[k][1] for k in keys]))

    prompt_ids = dataset.all_prompt_ids.astype(np.int32)
    local_batch = args.train_batch_size * num_local

    def host_batch(step):
        """This host's share of one optimizer step: arrays [local devices, accumulation, batch, ...].

        Example index of (step, micro, host, position) = (step*accum + micro)*G + host*local_batch + position,
        the same formula as the PyTorch script: the union over hosts and devices is the global batch.
        """
        means, stds, keys, ids = [], [], [], []
        for micro in range(accumulation):
            first = (step * accumulation + micro) * global_batch + process * local_batch
            examples = [dataset.example(first + i) for i in range(local_batch)]
            mean, std = posterior([(image, flip) for image, flip, _ in examples])
            means.append(mean)
            stds.append(std)
            keys.append(np.stack([raw_prng_key(example_seed(seed, first + i, STREAM_NOISE)) for i in range(local_batch)]))
            ids.append(prompt_ids[[t for _, _, t in examples]])
        batch = {"mean": np.stack(means), "std": np.stack(stds), "keys": np.stack(keys), "ids": np.stack(ids)}
        # [accum, local_batch, ...] -> [devices, accum, batch, ...]
        return {k: np.swapaxes(v.reshape((accumulation, num_local, args.train_batch_size) + v.shape[2:]), 0, 1)
                for k, v in batch.items()}

    loss_fn = make_denoising_loss(models["text_encoder"], models["unet"], noise_scheduler, placeholder_ids, weight_dtype)
    train_step = jax.pmap(make_train_step(loss_fn, optimizer, scaling_factor, latent_shape, num_timesteps),
                          axis_name="batch", donate_argnums=(0, 1))  # all hosts' devices: pmean spans them
    # Inputs laid out exactly as pmap lays out its outputs (same mesh axis name), so that step 2
    # reuses step 1's executable instead of compiling the step a second time.
    device_split = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("batch",)),
                                              jax.sharding.PartitionSpec("batch"))
    replicated = replicate((vectors, opt_state, frozen_host, scheduler_state), devices, device_split)
    p_vectors, p_opt_state, p_frozen, p_scheduler_state = replicated
    del frozen_host

    def unreplicated_params():
        """Current params for sampling/saving (device-0 copies), with the learned rows merged in."""
        frozen = jax.tree.map(lambda x: x[0], p_frozen)
        te = merged_text_encoder_params(frozen["text_encoder"], placeholder_ids, p_vectors[0])
        return {"text_encoder": te, "unet": frozen["unet"], "vae": vae_params}

    validator = None
    stop_signal = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous_handlers[sig] = signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
        except ValueError:  # not the main thread (e.g. under a test harness)
            pass

    logger.info("***** Running training *****")
    logger.info("  frozen weights %s, learned vectors float32, VAE float32", jnp.dtype(weight_dtype).name)
    logger.info("  images = %d, examples per epoch = %d, hosts = %d, devices = %d (local %d)", dataset.num_images,
                len(dataset), num_processes, global_devices, num_local)
    logger.info("  batch per device = %d, accumulation = %d, global batch = %d, steps = %d, seed = %d",
                args.train_batch_size, accumulation, global_batch * accumulation, max_train_steps, seed)
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not is_main)
    loss_history = []  # (step, loss) of this run, drawn to output_dir/loss.png at the end

    # ---- Loop
    while global_step < max_train_steps:
        lr = float(lrs[min(global_step, max_train_steps)])
        batch = jax.tree.map(lambda x: jax.device_put(x, device_split), host_batch(global_step))
        p_vectors, p_opt_state, p_loss = train_step(p_vectors, p_opt_state, p_frozen, p_scheduler_state, batch)
        loss_value = float(p_loss[0])
        if not math.isfinite(loss_value):
            raise UserError(f"loss became {loss_value} at step {global_step + 1}; lower --learning_rate or use fp32. "
                            "The last saved embedding and checkpoint are untouched")
        host_vectors = np.asarray(p_vectors[0])
        if not np.isfinite(host_vectors).all():
            raise UserError(f"the learned vectors became non-finite at step {global_step + 1}; lower --learning_rate. "
                            "The last saved embedding and checkpoint are untouched")
        global_step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        loss_history.append((global_step, loss_value))
        trackers.log({"loss": loss_value, "lr": lr}, global_step)

        interrupted = bool(stop_signal)
        if num_processes > 1:
            from jax.experimental import multihost_utils

            interrupted = bool(np.any(multihost_utils.process_allgather(np.int32(interrupted))))
        last = global_step == max_train_steps
        if is_main:
            if (args.save_steps and global_step % args.save_steps == 0) or (interrupted and not last):
                embeddings.write_diffusers(args.output_dir, args.placeholder_token, host_vectors,
                                           safe_serialization=not args.no_safe_serialization,
                                           suffix=f"-steps-{global_step}")
            if (args.checkpointing_steps and global_step % args.checkpointing_steps == 0) or (interrupted and not last):
                tensors, state = checkpoint_state(host_vectors, jax.tree.map(lambda x: x[0], p_opt_state))
                path = checkpoints.save_checkpoint(args.output_dir, global_step, tensors, state,
                                                   args.checkpoints_total_limit)
                logger.info("saved %s", path)
            if args.validation_prompt and validation_steps and global_step % validation_steps == 0:
                validator = validator or Validator(args, models, tokenizer, scheduler_config)
                validator(unreplicated_params(), global_step, trackers)
        if interrupted and not last:
            logger.warning("stopped by signal at step %d; resume with --resume_from_checkpoint latest", global_step)
            trackers.close()
            return 130
    progress.close()

    # ---- Save
    if is_main:
        outputs.finish_run(args, np.asarray(p_vectors[0], np.float32), global_step, loss_history, hub_repo_id,
                           lambda: save_full_pipeline(args, args.output_dir, models, unreplicated_params(), tokenizer,
                                                      scheduler_config), logger)
    trackers.close()
    return 0


def replicate(tree, devices, sharding):
    """One copy of every leaf on each device, as a [devices, ...] array laid out like pmap's outputs.

    Copies go straight to their device: stacking first would put all of them on device 0 (or in host
    memory) at once, which does not fit for SD-sized weights on 8 accelerators.
    """
    import jax

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + tuple(x.shape), sharding, shards)

    return jax.tree.map(put, tree)


def _posterior(vae, vae_params, pixels):
    """VAE posterior (mean, std) of NCHW pixels, returned NCHW like the PyTorch VAE's."""
    import jax.numpy as jnp

    dist = vae.apply({"params": vae_params}, pixels, method=vae.encode).latent_dist
    return jnp.transpose(dist.mean, (0, 3, 1, 2)), jnp.transpose(dist.std, (0, 3, 1, 2))


if __name__ == "__main__":
    sys.exit(run_cli(main))
