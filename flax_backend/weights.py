"""Loading a pipeline's weights for Flax: Flax (flax_model.msgpack) or PyTorch (.safetensors / .bin)
weights, converted here and checked key by key, so nothing is ever left at its random initialisation."""

import json
import logging
import os
import warnings

import numpy as np

from textual_inversion_core import families
from textual_inversion_core.errors import UserError

logger = logging.getLogger("textual_inversion_flax")

# The components of each model family: SD-1.x/2.x, and SDXL (a second, projected text encoder).
COMPONENTS = {"sd": ("text_encoder", "vae", "unet"), "sdxl": ("text_encoder", "text_encoder_2", "vae", "unet")}
TOKENIZERS = {"sd": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
# Buffers some PyTorch checkpoints carry that are not parameters in Flax (recomputed there).
_PT_BUFFER_SUFFIXES = ("position_ids", "num_batches_tracked")
_SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


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
        patterns = ["model_index.json", "tokenizer/*", "tokenizer_2/*", "scheduler/*"]
        for component in COMPONENTS["sdxl"]:
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


def check_family_has_flax(name_or_path, revision=None):
    """Stop on a family diffusers has no Flax models for (SD3, Flux.1), from model_index.json alone (a local folder
    or the Hub cache), before any image or model loads. Returns the FamilySpec, or None when not told yet."""
    spec = families.family_of(name_or_path, revision)
    if spec is not None and not spec.flax:
        article = "an" if spec.label.startswith("SD") else "a"
        raise UserError(f"--pretrained_model_name_or_path {str(name_or_path)!r} is {article} {spec.label} pipeline "
                        f"({spec.pipeline_class}), which diffusers has no Flax models for; train it with "
                        "textual_inversion.py (the same flags)")
    return spec


def model_family(folder):
    """"sdxl" or "sd" of a pipeline folder (see families.family_of); SD3 and Flux.1 stop with one line."""
    spec = check_family_has_flax(folder)
    if spec is None:  # an unreadable model_index.json: the folders decide, as for a folder without one
        return "sdxl" if os.path.isdir(os.path.join(folder, "text_encoder_2")) else "sd"
    return spec.name


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
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix that the Flax model uses
    (SDXL's projected encoder keeps `text_projection` beside it, unprefixed)."""
    outside = ("text_projection",)
    wants_prefix = all(k[0] == "text_model" for k in expected if k[0] not in outside)
    if wants_prefix and pt_state and not any(k.startswith("text_model.") for k in pt_state):
        return {(k if k.startswith(outside) else "text_model." + k): v for k, v in pt_state.items()}, True
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


# UNet settings diffusers' Flax UNet (0.39) has no option for: it silently computes with the value
# on the right (e.g. GroupNorm is always 32 groups), so a model saved with another value would train
# a different network than the one users sample with. Weights alone cannot show this.
FLAX_UNET_FIXED_SETTINGS = {
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3, "class_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None, "cross_attention_norm": None,
    "attention_type": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "dual_cross_attention": False, "timestep_post_act": None,
}


def check_flax_unet_config(config, folder):
    """Stop with one line when the UNet's config asks for something the Flax UNet cannot compute."""
    differing = [f"{key}={config[key]!r} (Flax always uses {fixed!r})" for key, fixed in FLAX_UNET_FIXED_SETTINGS.items()
                 if key in config and config[key] != fixed and not (isinstance(fixed, float) and config[key] is not None
                                                                  and abs(config[key] - fixed) < 1e-12)]
    if differing:
        raise UserError(f"{folder}/config.json sets {', '.join(differing)}, which diffusers' Flax UNet cannot "
                        "reproduce; train this model with textual_inversion.py")


def load_component(folder, name, variant, dtype, config_overrides=None):
    """(flax model, params as a nested dict of numpy float32 arrays, source description).

    config_overrides: module options that change how the model computes, not its weights."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    sub = os.path.join(folder, name)
    if not os.path.isdir(sub):
        raise UserError(f"{folder!r} has no {name}/ folder; --pretrained_model_name_or_path must be a full SD pipeline")
    rng = jax.random.PRNGKey(0)
    if name in ("text_encoder", "text_encoder_2"):
        from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

        config = CLIPTextConfig.from_pretrained(sub)
        cls = FlaxCLIPTextModelWithProjection if name == "text_encoder_2" else FlaxCLIPTextModel
        model = cls(config, dtype=dtype, _do_init=False)
        library = "transformers"
        shapes = jax.eval_shape(lambda r: model.init_weights(r, model.input_shape), rng)
    else:
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

        cls = FlaxUNet2DConditionModel if name == "unet" else FlaxAutoencoderKL
        stored_config = cls.load_config(sub)
        if name == "unet":
            check_flax_unet_config(stored_config, sub)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_config(stored_config, dtype=dtype, **(config_overrides or {}))
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
    """(family, tokenizers, noise_scheduler, scheduler_state, scheduler_config, {component: (model, params, note)})."""
    import jax.numpy as jnp

    from textual_inversion_core.tokenizer_files import load_clip_tokenizer

    family = model_family(folder)
    tokenizers = []
    for i, sub in enumerate(TOKENIZERS[family]):
        name = args.tokenizer_name if args.tokenizer_name and i == 0 else os.path.join(folder, sub)
        try:
            tokenizers.append(load_clip_tokenizer(name, revision=args.revision if args.tokenizer_name and i == 0
                                                  else None))
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load the tokenizer ({first}); check --pretrained_model_name_or_path / "
                            "--tokenizer_name") from err
    noise_scheduler, scheduler_state, scheduler_config = noise_schedule(folder)
    loaded = {}
    overrides = {}
    if args.enable_xformers_memory_efficient_attention:
        # xFormers is PyTorch-only; the JAX counterpart is diffusers' chunked attention, which computes the
        # same softmax in query/key blocks and recomputes them in the backward instead of keeping each
        # [heads, tokens, tokens] matrix alive (SD-1.5 at 512 px: 0.54 GB per self-attention layer in fp32).
        overrides["unet"] = {"use_memory_efficient_attention": True}
    for name in COMPONENTS[family]:
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
    return family, tokenizers, noise_scheduler, scheduler_state, scheduler_config, loaded
