"""Run-level behaviour the PyTorch trainer owes its users: trackers get the validation images, a
mixed-precision full pipeline is saved in fp32, --learning_rate 0 exports the initializer, and an
in-process caller gets its signal handlers back."""

import glob
import os
import signal
import types

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import base_args, read_vectors, run_in_process, run_script


def _tensorboard_image_steps(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    steps = []
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path, size_guidance={IMAGES: 0})
        events.Reload()
        for tag in events.Tags()[IMAGES]:
            steps += [(tag, e.step) for e in events.Images(tag)]
    return steps


def test_report_to_all_logs_validation_images_to_every_installed_tracker(tiny_pipeline, train_images, tmp_path):
    """--report_to all means the installed trackers (here TensorBoard and wandb; comet_ml is not installed),
    and each gets the validation images, not only TensorBoard."""
    out, wandb_dir = str(tmp_path / "out"), str(tmp_path / "wandb")
    os.makedirs(wandb_dir)
    result = run_script(base_args(tiny_pipeline, train_images, out, report_to="all", max_train_steps=2,
                                  validation_prompt="a photo of <cat-toy>", validation_steps=2, num_validation_images=1),
                        env={"WANDB_MODE": "offline", "WANDB_DIR": wandb_dir, "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(os.path.join(out, "validation")) == ["step-000002-0.png"]
    assert ("validation", 2) in _tensorboard_image_steps(os.path.join(out, "logs"))
    media = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "files", "media", "images", "validation_2_*.png"))
    assert len(media) == 1, glob.glob(os.path.join(wandb_dir, "**"), recursive=True)


def test_bf16_full_pipeline_is_saved_in_fp32_with_the_original_weights(tiny_pipeline, train_images, tmp_path):
    out = str(tmp_path / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, mixed_precision="bf16", max_train_steps=2,
                                      save_as_full_pipeline=True, num_vectors=2))
    assert result.returncode == 0, result.stderr[-3000:]
    learned = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    for component in ("unet", "vae"):
        original = load_file(os.path.join(tiny_pipeline, component, "diffusion_pytorch_model.safetensors"))
        saved = load_file(os.path.join(out, component, "diffusion_pytorch_model.safetensors"))
        assert sorted(saved) == sorted(original)
        for key in original:  # bit-identical, not rounded through bf16
            assert saved[key].dtype == np.float32 and np.array_equal(saved[key], original[key]), (component, key)
    original = load_file(os.path.join(tiny_pipeline, "text_encoder", "model.safetensors"))
    saved = load_file(os.path.join(out, "text_encoder", "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {np.dtype(np.float32)}
    key = "text_model.embeddings.token_embedding.weight"
    rows = original[key].shape[0]
    assert saved[key].shape[0] == rows + 2
    assert np.array_equal(saved[key][:rows], original[key])  # every other vocabulary row unchanged
    assert np.array_equal(saved[key][rows:], learned)  # the learned rows exactly, not rounded
    for name in original:
        if name != key:
            assert np.array_equal(saved[name], original[name]), name


def test_zero_learning_rate_exports_the_initializer_and_gives_the_signal_handlers_back(tiny_pipeline, train_images,
                                                                                        tmp_path):
    import textual_inversion

    def mine(signum, frame):
        pass

    out = str(tmp_path / "out")
    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert textual_inversion.main(base_args(tiny_pipeline, train_images, out, learning_rate=0, max_train_steps=2,
                                                num_vectors=2, adam_weight_decay=0.5)) == 0
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    toy = tokenizer.encode("toy", add_special_tokens=False)[0]
    table = load_file(os.path.join(tiny_pipeline, "text_encoder", "model.safetensors"))[
        "text_model.embeddings.token_embedding.weight"]
    assert np.array_equal(read_vectors(os.path.join(out, "learned_embeds.safetensors")), np.stack([table[toy]] * 2))


def _initializer_rows(pipeline, word, count):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    row = tokenizer.encode(word, add_special_tokens=False)[0]
    table = load_file(os.path.join(pipeline, "text_encoder", "model.safetensors"))[
        "text_model.embeddings.token_embedding.weight"]
    return np.stack([table[row]] * count)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # CPU autocast runs both
def test_mixed_precision_starts_from_the_initializer_itself(tiny_pipeline, train_images, tmp_path, precision):
    """The trainable vectors are fp32 from the start: --learning_rate 0 with --mixed_precision returns the
    initializer exactly, not rounded through bf16/fp16 (it was 1.2e-4 off with bf16, 1.4e-5 with fp16)."""
    out = str(tmp_path / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, mixed_precision=precision, learning_rate=0,
                                      max_train_steps=1, num_vectors=2, export_formats="diffusers"))
    assert result.returncode == 0, result.stderr[-3000:]
    learned = read_vectors(os.path.join(out, "learned_embeds.safetensors"))
    np.testing.assert_array_equal(learned, _initializer_rows(tiny_pipeline, "toy", 2))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_placeholder_vectors_stay_fp32_in_a_half_text_encoder(tiny_pipeline, dtype_name):
    """As the trainer prepares it: the text encoder cast to half, then the placeholder embedding inserted. The
    vectors are the fp32 start vectors, the forward pass runs in half, and the gradient reaches the fp32 vectors."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from torch_backend.model import insert_placeholder_embedding

    dtype = getattr(torch, dtype_name)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    tokenizer.add_tokens(["<t>"])
    text_encoder = CLIPTextModel.from_pretrained(tiny_pipeline, subfolder="text_encoder").to(dtype=dtype).eval()
    start = _initializer_rows(tiny_pipeline, "toy", 1)
    embedding = insert_placeholder_embedding(text_encoder, len(tokenizer), [tokenizer.convert_tokens_to_ids("<t>")],
                                             start)
    assert embedding.vectors.dtype == torch.float32 and embedding.vectors.requires_grad
    np.testing.assert_array_equal(embedding.vectors.detach().numpy(), start)
    assert {p.dtype for name, p in text_encoder.named_parameters() if not name.endswith("vectors")} == {dtype}
    ids = torch.tensor(tokenizer(["a photo of a <t>"], padding="max_length", max_length=77).input_ids)
    hidden = text_encoder(ids)[0]
    assert hidden.dtype == dtype
    hidden.float().square().mean().backward()
    assert embedding.vectors.grad.dtype == torch.float32 and embedding.vectors.grad.abs().sum() > 0


def test_xformers_flag_switches_the_unet_and_the_validation_pipeline(tiny_pipeline, train_images, tmp_path,
                                                                      monkeypatch):
    """On a machine with xformers and CUDA (simulated: the guard sees both) the flag is applied: diffusers'
    enable_xformers_memory_efficient_attention (a spy here) is called on the UNet and the VAE, and the
    validation pipeline samples with those same modules."""
    import importlib.util
    from types import SimpleNamespace
    from unittest import mock

    import torch
    from diffusers import ModelMixin, StableDiffusionPipeline
    from PIL import Image

    import textual_inversion

    real_find_spec, real_check = importlib.util.find_spec, textual_inversion.check_xformers

    def check_on_a_gpu_machine(args):
        def find_spec(name, *rest):
            return mock.sentinel.spec if name == "xformers" else real_find_spec(name, *rest)

        with mock.patch("importlib.util.find_spec", find_spec), mock.patch.object(torch.cuda, "is_available",
                                                                                 return_value=True):
            real_check(args)

    enabled, sampled_with = [], []

    def spy(self, attention_op=None):
        enabled.append(self)

    def call(self, prompt, **kwargs):  # what sampling would use; 25 UNet steps are not needed to see it
        sampled_with.append((self.unet, self.vae))
        return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]))])

    monkeypatch.setattr(textual_inversion, "check_xformers", check_on_a_gpu_machine)
    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention", spy)
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    out = str(tmp_path / "out")
    assert textual_inversion.main(base_args(tiny_pipeline, train_images, out, max_train_steps=1,
                                            enable_xformers_memory_efficient_attention=True,
                                            validation_prompt="a photo of <cat-toy>", validation_steps=1,
                                            num_validation_images=1, export_formats="diffusers")) == 0
    assert sorted(type(m).__name__ for m in enabled) == ["AutoencoderKL", "UNet2DConditionModel"]
    assert sampled_with and all(unet is enabled[0] or unet is enabled[1] for unet, _ in sampled_with)
    assert all(any(vae is m for m in enabled) for _, vae in sampled_with)
    assert os.listdir(os.path.join(out, "validation")) == ["step-000001-0.png"]


def test_xformers_that_does_not_run_is_one_line(tiny_pipeline, monkeypatch):
    """A broken xformers build (diffusers' own check op fails) ends in one line naming the flag, not a traceback."""
    from diffusers import ModelMixin

    from textual_inversion_core.errors import UserError
    from torch_backend import model as tm

    def broken(self, attention_op=None):
        raise RuntimeError("No operator found for `memory_efficient_attention_forward`\nwith inputs: ...")

    monkeypatch.setattr(ModelMixin, "enable_xformers_memory_efficient_attention", broken)
    models = types.SimpleNamespace(vae=object(), denoiser=ModelMixin())  # what enable_xformers_attention reads
    with pytest.raises(UserError) as info:
        tm.enable_xformers_attention(models)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--enable_xformers_memory_efficient_attention")
    assert "No operator found" in message and "drop the flag" in message
