"""The PyTorch half of the paper scores (textual_inversion_core.evaluate): a CLIP model that embeds pictures and
texts, and a sampler that draws pictures of prompts with the models of a run."""

import contextlib

import numpy as np
import torch

from textual_inversion_core.errors import UserError
from textual_inversion_core.evaluate import PaperScorer, check_clip_folder, reference_pictures
from textual_inversion_core.validation import validation_seed


class Clip:
    """CLIPModel + CLIPProcessor: unit-length embeddings of pictures and of texts (float64 numpy)."""

    def __init__(self, name_or_path, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor

        check_clip_folder(name_or_path)  # a local folder that is not CLIP: one line, not a transformers traceback
        try:
            self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError, TypeError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UserError(f"--eval_clip_model {name_or_path!r} did not load as a CLIP model ({first}); give a "
                            "CLIPModel folder or hub id, e.g. openai/clip-vit-large-patch14") from None
        self.device = device

    @staticmethod
    def _unit(features):
        features = features.double().cpu().numpy()
        return features / np.linalg.norm(features, axis=-1, keepdims=True)

    @torch.no_grad()
    def images(self, pictures):
        pixels = self.processor(images=list(pictures), return_tensors="pt")["pixel_values"].to(self.device)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self._unit(self.model.visual_projection(pooled))

    @torch.no_grad()
    def texts(self, texts):
        tokens = self.processor.tokenizer(list(texts), padding="max_length", truncation=True,
                                          max_length=self.processor.tokenizer.model_max_length, return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        return self._unit(self.model.text_projection(pooled))


def make_sampler(models, resolution, num_inference_steps, autocast=None):
    """sample(prompt, seeds) -> PIL pictures, one per seed, each from its own generator (so a picture does not
    depend on how many are drawn together), with DPM-Solver (the validation images' sampler) and guidance 7.5."""
    from diffusers import DPMSolverMultistepScheduler

    from .pipeline import _components, pipeline_class

    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
        if models.family.spec.name == "sd" else {}
    pipeline = pipeline_class(models.family)(
        vae=models.vae, unet=models.denoiser, scheduler=DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
        **_components(models), **extra)
    pipeline.set_progress_bar_config(disable=True)

    def sample(prompt, seeds):
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
            return pipeline(prompt, num_inference_steps=num_inference_steps, generator=generators,
                            num_images_per_prompt=len(seeds), height=resolution, width=resolution).images

    return sample


def text_encoder_sets(models, vectors):
    """A saved step's vectors (best.read_step_vectors: one array, or a dict by file key such as SDXL's {"clip_l",
    "clip_g"}) as one [n, dim] array per text encoder, in the text encoders' order."""
    return [vectors[e.file_key] for e in models.encoders] if isinstance(vectors, dict) else [vectors]


def set_vectors(models, vectors):
    """Write a saved step's vectors (one array, or a dict by file key such as SDXL's {"clip_l", "clip_g"}) into the
    PlaceholderEmbedding of each text encoder."""
    with torch.no_grad():
        for text_encoder, one_set in zip(models.text_encoders, text_encoder_sets(models, vectors), strict=True):
            embedding = text_encoder.get_input_embeddings()
            embedding.vectors.copy_(torch.from_numpy(np.asarray(one_set, np.float32)))


def paper_scorer(args, models, device, autocast=None):
    """The core PaperScorer of a run's flags (--eval_clip_model, --eval_num_samples, --eval_inference_steps) on these
    models: samples drawn with them at --resolution, scored by the CLIP model against --train_data_dir's images, with
    the seeds of --validation_seed (else --seed, else 0)."""
    clip = Clip(args.eval_clip_model, device)
    sampler = make_sampler(models, args.resolution, args.eval_inference_steps, autocast)
    return PaperScorer(clip, sampler, reference_pictures(args.train_data_dir, args.resolution, args.center_crop,
                                                         args.recursive),
                       args.learnable_property, args.eval_num_samples, validation_seed(args))


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_scoring_models(settings, vectors):
    """The models of a finished run, as the trainer held them (placeholder tokens in the tokenizers, a
    PlaceholderEmbedding in each text encoder), in fp32, for the evaluate command. vectors: a saved step's (one
    array, or SDXL's {"clip_l", "clip_g"}), which sets the number of vectors. Returns (models, placeholder text)."""
    import argparse

    from textual_inversion_core.data import placeholder_tokens_for
    from textual_inversion_core.tokens import placeholder_string

    from . import families
    from .model import insert_placeholder_embedding

    family = families.select(argparse.Namespace(
        pretrained_model_name_or_path=settings.pretrained_model_name_or_path, revision=settings.revision,
        variant=settings.variant, tokenizer_name=None))
    models = family.load_text_side(family.load_tokenizers())
    family.load_image_side(models)
    # fp32 as the trainer holds them without --mixed_precision: transformers keeps a text encoder stored in fp16 (most
    # published checkpoints) in fp16, which would score the same file differently from training.
    for module in [models.vae, models.denoiser] + list(models.text_encoders):
        module.to(dtype=torch.float32)
    vector_sets = text_encoder_sets(models, vectors)
    if len(vector_sets) != len(models.text_encoders):
        raise UserError(f"the saved vectors have {len(vector_sets)} set(s), the model {len(models.text_encoders)} text "
                        "encoder(s); pass the --pretrained_model_name_or_path the run trained on")
    texts = []
    for tokenizer, text_encoder, start in zip(models.tokenizers, models.text_encoders, vector_sets):
        tokens = placeholder_tokens_for(settings.placeholder_token, len(start))
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        insert_placeholder_embedding(text_encoder, len(tokenizer), ids, start)
        text_encoder.eval()
        texts.append(placeholder_string(tokenizer, ids))
    models.denoiser.eval()
    return models, texts[0]
