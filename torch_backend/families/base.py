"""What every model family shares in the PyTorch trainer: loading its parts, the cache of frozen text encoders and the
loss of a micro-batch. A family (sd.py, sdxl.py, sd3.py, flux.py) adds its classes, how its text encoders' outputs
become the denoiser's conditioning, and its objective (DDPM or flow matching)."""

import gc
import os

import torch

from textual_inversion_core import families as core_families
from textual_inversion_core import model_files
from textual_inversion_core.errors import UserError

from ..model import verify_text_encoder_loaded


class Models:
    """What training reads. encoders: the family's EncoderSpecs; tokenizers / text_encoders: one per encoder (a frozen
    encoder's entry is None once its outputs are cached); cached: {encoder index: tuple of tensors [prompt rows, ...]};
    trained: the indices of the encoders whose vectors learn; denoiser: the UNet or transformer."""

    def __init__(self, family, tokenizers, text_encoders, trained):
        self.family, self.tokenizers, self.text_encoders, self.trained = family, tokenizers, text_encoders, trained
        self.encoders = family.spec.encoders
        self.cached = {}
        self.vae = self.denoiser = self.noise_scheduler = None


def load_error(model, err):
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load the model {model!r} ({first}); check the path or hub id, --revision and --variant")


class Family:
    """A model family in the PyTorch trainer. Subclasses set spec (the core FamilySpec), text_encoder_classes (one
    transformers class name per encoder), denoiser_class, scheduler_class, and implement encode, conditioning,
    device_batch and batch_loss."""

    spec: core_families.FamilySpec
    text_encoder_classes: tuple
    denoiser_class: str
    scheduler_class: str

    def __init__(self, args):
        self.args = args
        self.trained = tuple(i for i, e in enumerate(self.spec.encoders)
                             if e in core_families.trained_encoders(self.spec, getattr(args, "enable_t5_ti", False)))

    # ---- Loading
    def check_model_configs(self):
        """Checks of the model's config files before anything big loads (a family overrides)."""

    def check_loaded(self, models):
        """Checks once the models are loaded (a family overrides)."""

    def max_length(self, index, tokenizer):
        """Tokens per prompt of encoder index: the tokenizer's own limit (T5: --max_sequence_length)."""
        return tokenizer.model_max_length

    def load_tokenizers(self):
        from transformers import AutoTokenizer

        from textual_inversion_core.tokenizer_files import load_clip_tokenizer

        args, model = self.args, self.args.pretrained_model_name_or_path
        self._check_folder()
        tokenizers = []
        try:
            for i, encoder in enumerate(self.spec.encoders):
                if args.tokenizer_name and i == 0:  # --tokenizer_name replaces the first tokenizer, as in diffusers
                    tokenizers.append(load_clip_tokenizer(args.tokenizer_name, revision=args.revision))
                elif encoder.kind == "clip":
                    tokenizers.append(load_clip_tokenizer(model, subfolder=encoder.tokenizer, revision=args.revision))
                else:
                    tokenizers.append(AutoTokenizer.from_pretrained(model, subfolder=encoder.tokenizer,
                                                                    revision=args.revision))
        except (OSError, ValueError, EnvironmentError) as err:
            raise load_error(model, err) from err
        return tokenizers

    def add_placeholders(self, tokenizers):
        """The placeholder tokens into the tokenizer of every trained encoder: {encoder index: (placeholder ids,
        initializer ids)}. A word T5's vocabulary cannot encode as one token is refused naming T5."""
        from textual_inversion_core.tokens import add_placeholder_tokens

        args, added = self.args, {}
        for i in self.trained:
            try:
                added[i] = add_placeholder_tokens(tokenizers[i], args.placeholder_token, args.num_vectors,
                                                  args.initializer_token)
            except UserError as err:
                if self.spec.encoders[i].kind != "t5":
                    raise
                raise UserError(f"T5's vocabulary ({self.spec.encoders[i].tokenizer}/, trained with --enable_t5_ti): "
                                f"{err}; or drop --enable_t5_ti") from None
        return added

    def _check_folder(self):
        model = self.args.pretrained_model_name_or_path
        if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")) \
                and not os.path.isdir(os.path.join(model, self.spec.denoiser)):
            raise UserError(f"--pretrained_model_name_or_path {model!r} is not a pipeline folder (no model_index.json "
                            f"or {self.spec.denoiser}/); point it at the folder that holds {self.spec.denoiser}/, vae/, "
                            "text_encoder/")

    def load_text_encoder(self, index):
        """Text encoder `index` of the model, checked to hold its own weights."""
        import transformers

        args, model = self.args, self.args.pretrained_model_name_or_path
        folder = self.spec.encoders[index].subfolder
        cls = getattr(transformers, self.text_encoder_classes[index])
        try:
            text_encoder = cls.from_pretrained(model, subfolder=folder, variant=args.variant, revision=args.revision)
        except (OSError, ValueError, EnvironmentError) as err:
            raise load_error(model, err) from err
        if os.path.isdir(model):
            verify_text_encoder_loaded(text_encoder, model, folder)
        return text_encoder

    def load_text_side(self, tokenizers):
        return Models(self, tokenizers, [self.load_text_encoder(i) for i in range(len(self.spec.encoders))],
                      self.trained)

    def load_image_side(self, models, denoiser_dtype=None):
        """The scheduler, the VAE and the denoiser into models (after the frozen encoders are cached and freed, so the
        two largest parts are never in memory together). denoiser_dtype: the training's weight dtype, so that a bf16
        transformer is read as bf16 and never held as a whole fp32 copy (SD3.5-medium: 9.9 GB); None: fp32."""
        import diffusers

        args, model = self.args, self.args.pretrained_model_name_or_path
        common = dict(revision=args.revision)
        try:
            models.noise_scheduler = getattr(diffusers, self.scheduler_class).from_pretrained(
                model, subfolder="scheduler", **common)
            models.vae = diffusers.AutoencoderKL.from_pretrained(model, subfolder="vae", variant=args.variant, **common)
            models.denoiser = getattr(diffusers, self.denoiser_class).from_pretrained(
                model, subfolder=self.spec.denoiser, variant=args.variant, torch_dtype=denoiser_dtype, **common)
        except (OSError, ValueError, EnvironmentError) as err:
            raise load_error(model, err) from err
        self.check_loaded(models)
        return models

    # ---- Frozen encoders: run once per distinct prompt, then freed
    def cache_frozen_encoders(self, models, prompt_ids, device, batch_size=8):
        """Each frozen encoder's outputs for every prompt row (what encode returns, rows stacked), kept on the device;
        then the encoder itself is dropped. Returns the names of the encoders cached."""
        cached = []
        for i in range(len(models.text_encoders)):
            if i in models.trained or models.text_encoders[i] is None:
                continue
            ids, chunks = prompt_ids[i], []
            with torch.no_grad():
                for start in range(0, len(ids), batch_size):
                    chunks.append(self.encode(i, models.text_encoders[i], ids[start:start + batch_size].to(device)))
            models.cached[i] = tuple(torch.cat(parts) for parts in zip(*chunks))
            models.text_encoders[i] = None  # the only reference: the encoder's memory is released here
            cached.append(self.spec.encoders[i])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return cached

    def encoder_outputs(self, models, batch):
        """Each encoder's outputs for the examples of a DeviceBatch: trained ones run on their ids, frozen ones are
        read from the cache by prompt row."""
        outputs, position = [], {i: n for n, i in enumerate(models.trained)}
        for i in range(len(self.spec.encoders)):
            if i in models.cached:
                rows = batch.rows.to(models.cached[i][0].device)
                outputs.append(tuple(t[rows] for t in models.cached[i]))
            else:
                outputs.append(self.encode(i, models.text_encoders[i], batch.ids[position[i]]))
        return outputs

    # ---- What the run says and writes
    def describe(self, models):
        """The start banner's part on the model: the family, which encoders learn, which were cached and freed."""
        names = [f"{e.file_key} ({e.subfolder})" for e in self.spec.encoders]
        trained = ", ".join(names[i] for i in models.trained)
        line = f"model = {self.spec.label}, trained: {trained}"
        frozen = [names[i] for i in sorted(models.cached)]
        if frozen:
            line += f"; cached once per prompt and freed: {', '.join(frozen)}"
        return line

    def output_vectors(self, vector_sets):
        """What the embedding writers take: {file key: [n, dim]} of the trained encoders, in the pipeline's order."""
        import numpy as np

        return {self.spec.encoders[i].file_key: np.asarray(v, np.float32) for i, v in zip(self.trained, vector_sets)}


def read_config(name_or_path, subfolder, revision=None):
    """A part's config.json (a local folder or the Hub cache) as a dict, without loading anything; None when it is
    not on this machine yet (the family checks the loaded model then)."""
    return model_files.read_json(name_or_path, f"{subfolder}/config.json", revision)


class DDPMFamily(Family):
    """SD-1.x/2.x and SDXL: a UNet trained with DDPM noise (or v) prediction (torch_backend/ddpm.py)."""

    denoiser_class = "UNet2DConditionModel"
    scheduler_class = "DDPMScheduler"
    uses_time_ids = False  # SDXL's micro-conditioning

    def check_loaded(self, models):
        from textual_inversion_core.run import check_prediction_type

        check_prediction_type(models.noise_scheduler.config.prediction_type)

    def device_batch(self, batch, micro, prompt_ids, control, models, device):
        from .. import ddpm

        return ddpm.device_batch(batch, micro, prompt_ids, control.timestep_range, models.vae.config.scaling_factor,
                                 device, control.noise_offset, with_time_ids=self.uses_time_ids)

    def held_out_batch(self, batch, prompt_ids, models, device):
        """A validation batch (textual_inversion_core.validation) as a DeviceBatch: the examples' keyed posterior
        samples and noise, no noise offset, and the batch's fixed timesteps."""
        from .. import ddpm

        drawn = ddpm.device_batch(batch, 0, prompt_ids, (0, 1), models.vae.config.scaling_factor, device,
                                  with_time_ids=self.uses_time_ids)
        return drawn._replace(timesteps=torch.from_numpy(batch["timestep"][0]).to(device))

    def batch_loss(self, models, batch, weight_dtype, control=None):
        from .. import ddpm

        hidden, added = self.conditioning(self.encoder_outputs(models, batch), batch)
        return ddpm.prediction_loss(models.denoiser, models.noise_scheduler, batch.latents, batch.noise,
                                    batch.timesteps, hidden, added, weight_dtype, batch.mask,
                                    control.snr_gamma if control is not None else None)


class FlowFamily(Family):
    """SD3/SD3.5 and Flux.1: a transformer trained with flow matching (torch_backend/flow_matching.py)."""

    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    default_weighting_scheme: str
    default_max_sequence_length: int

    def __init__(self, args):
        from ..flow_matching import settings_from_args

        super().__init__(args)
        self.flow = settings_from_args(args, self.default_weighting_scheme)
        self.max_sequence_length = args.max_sequence_length or self.default_max_sequence_length

    def max_length(self, index, tokenizer):
        return self.max_sequence_length if self.spec.encoders[index].kind == "t5" else tokenizer.model_max_length

    def configs(self):
        """(transformer, vae, {encoder index: text encoder config}) from the model's files, or None if not here."""
        model, revision = self.args.pretrained_model_name_or_path, self.args.revision
        transformer, vae = read_config(model, self.spec.denoiser, revision), read_config(model, "vae", revision)
        encoders = {i: read_config(model, e.subfolder, revision) for i, e in enumerate(self.spec.encoders)}
        if transformer is None or vae is None or None in encoders.values():
            return None
        return transformer, vae, encoders

    def check_model_configs(self):
        found = self.configs()
        if found is not None:
            self.check_configs(*found)

    def check_loaded(self, models):
        self.check_model_configs()  # a hub model's config files are on this machine by now

    def check_configs(self, transformer, vae, encoders):
        """A transformer whose inputs this loss cannot build is refused in one line (a family adds its checks)."""
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        patch = 2  # Flux packs 2x2 latent patches; SD3's transformers patchify 2x2
        args = self.args
        sides = [args.resolution] + ([args.bucket_reso_steps] if args.enable_bucket else [])
        for side in sides:
            if side % (factor * patch):
                flag = "--resolution" if side == args.resolution else "--bucket_reso_steps"
                raise UserError(f"{flag} {side} gives latents the {self.spec.label} transformer cannot patch: use a "
                                f"multiple of {factor * patch} (the VAE's factor {factor} x {patch})")

    def device_batch(self, batch, micro, prompt_ids, control, models, device):
        from ..flow_matching import device_batch

        return device_batch(batch, micro, prompt_ids, self.flow, models.noise_scheduler, models.vae.config, device)

    def batch_loss(self, models, batch, weight_dtype, control=None):
        from ..flow_matching import flow_loss, noisy_input

        conditioning = self.conditioning(self.encoder_outputs(models, batch), batch)
        noisy = noisy_input(batch.latents, batch.noise, batch.sigmas).to(dtype=weight_dtype)
        prediction = self.predict(models, noisy, batch, {k: v.to(dtype=weight_dtype) for k, v in conditioning.items()})
        return flow_loss(prediction, batch.latents, batch.noise, batch.sigmas, self.flow.weighting_scheme, batch.mask)


def t5_width(config):
    return int(config.get("d_model", 0))


def clip_width(config, projected):
    config = config.get("text_config", config)
    return int(config.get("projection_dim" if projected else "hidden_size", 0))
