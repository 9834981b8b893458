"""Masked loss: where the weights come from (--alpha_mask, --masked_loss with --mask_dir), how they follow
the picture (resize, crop, flip) and reach latent resolution (area averaging), the mistakes that stop a
run, and the PyTorch loss: a masked-out region or example contributes no gradient, an all-ones mask is
the plain MSE, and per-example weighting keeps N processes equal to one."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_within_eps, write_images
from textual_inversion_core import run
from textual_inversion_core.data import TextualInversionDataset, area_average, load_image
from textual_inversion_core.errors import UserError
from torch_backend.ddpm import denoising_loss
from torch_backend.model import masked_mse

BUCKETS = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


def build(folder, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = TextualInversionDataset(folder, size=64, seed=5, repeats=2, **options)
    return dataset, [str(w.message) for w in caught]


def write_cutout(folder, name="cutout.png", size=(96, 64)):
    """A black picture whose alpha is a filled rectangle: composited over white, the pixels show the mask."""
    os.makedirs(folder, exist_ok=True)
    width, height = size
    alpha = np.zeros((height, width), np.uint8)
    alpha[8:40, 10:50] = 255
    Image.fromarray(np.dstack([np.zeros((height, width, 3), np.uint8), alpha]), mode="RGBA").save(os.path.join(folder, name))
    return str(folder)


# ---- Downsampling ----------------------------------------------------------------------------------------------

def test_area_averaging_to_latent_resolution():
    mask = np.zeros((4, 6), np.float32)
    mask[:2, :3] = 1
    mask[2:, 3] = 1  # one of the three columns of the lower right block
    np.testing.assert_array_equal(area_average(mask, (2, 2)), np.float32([[1, 0], [0, 1 / 3]]))
    np.testing.assert_array_equal(area_average(mask, (4, 6)), mask)
    with pytest.raises(ValueError, match="does not divide"):
        area_average(mask, (3, 2))


@pytest.mark.parametrize("options", [{}, {"center_crop": True}, dict(BUCKETS, random_crop=True)],
                         ids=["square resize", "centre crop", "buckets, random crop"])
def test_alpha_weights_follow_the_picture_through_resize_crop_and_flip(tmp_path, options):
    dataset, _ = build(write_cutout(tmp_path / "data"), alpha_mask=True, **options)
    assert dataset.has_masks
    keys = {dataset.latent_key(dataset.draw(i)) for i in range(40)}
    assert {key[1] for key in keys} == {False, True}
    for key in keys:
        pixels, weights = dataset.pixels(*key), dataset.pixel_mask(*key)
        assert weights.shape == pixels.shape[1:] and weights.dtype == np.float32
        assert 0 <= weights.min() and weights.max() <= 1
        # Black where opaque, white (over which transparency is composited) where transparent.
        assert (weights[pixels[0] < -0.9] > 0.9).all() and (weights[pixels[0] > 0.9] < 0.1).all()
        assert (weights > 0.9).sum() > 50 and (weights < 0.1).sum() > 50
        latent = dataset.latent_mask(key, (pixels.shape[1] // 2, pixels.shape[2] // 2))
        np.testing.assert_allclose(latent[0], weights.reshape(latent.shape[1], 2, latent.shape[2], 2).mean(axis=(1, 3)),
                                   rtol=1e-6)


def test_without_the_flags_transparency_is_white_as_before(tmp_path):
    folder = write_cutout(tmp_path / "data")
    dataset, _ = build(folder)
    assert not dataset.has_masks
    np.testing.assert_array_equal(dataset._images[0], load_image(os.path.join(folder, "cutout.png"), 64, False))
    assert dataset._images[0].max() == 255 and dataset._images[0].min() == 0


def test_images_without_alpha_train_unmasked_with_a_warning(tmp_path):
    folder = write_cutout(tmp_path / "data")
    write_images(folder, count=1)
    dataset, messages = build(folder, alpha_mask=True)
    warned = [m for m in messages if "--alpha_mask" in m]
    assert len(warned) == 1 and "1 of 2 images have no alpha channel" in warned[0] and "image_0.png" in warned[0]
    plain = dataset.image_paths.index(os.path.join(folder, "image_0.png"))
    assert (dataset.latent_mask((plain, True), (32, 32)) == 1).all()
    with pytest.raises(UserError, match="--alpha_mask: none of the 1 images has an alpha channel"):
        build(write_images(tmp_path / "opaque", count=1), alpha_mask=True)


# ---- Mask files ------------------------------------------------------------------------------------------------

@pytest.fixture
def masked_folder(tmp_path):
    """Three pictures; masks for two of them, one under another extension."""
    data = write_images(tmp_path / "data", count=3, size=(64, 80))  # 80 wide, 64 high
    masks = tmp_path / "masks"
    masks.mkdir()
    left = np.zeros((64, 80), np.uint8)
    left[:, :40] = 255
    Image.fromarray(left).save(masks / "image_0.png")
    Image.fromarray(255 - left).convert("RGB").save(masks / "image_1.jpg", quality=100)  # any image extension
    return data, str(masks)


def test_masks_are_matched_by_file_name_and_missing_ones_are_warned(masked_folder):
    data, masks = masked_folder
    dataset, messages = build(data, mask_dir=masks)
    warned = [m for m in messages if "--mask_dir" in m]
    assert len(warned) == 1 and "1 of 3 images have no mask" in warned[0] and "image_2.png" in warned[0]
    first, second = dataset.pixel_mask(0, False), dataset.pixel_mask(1, False)
    assert first[:, :30].min() == 1 and first[:, 34:].max() == 0  # 80 -> 64 wide: the left half stays the left half
    assert second[:, :30].max() < 0.05 and second[:, 34:].min() > 0.95
    np.testing.assert_array_equal(dataset.pixel_mask(0, True), first[:, ::-1])
    assert (dataset.pixel_mask(2, False) == 1).all()


def test_mask_mistakes_are_one_line_errors_naming_the_file(masked_folder, tmp_path):
    data, masks = masked_folder
    Image.new("L", (80, 60)).save(os.path.join(masks, "image_2.png"))
    with pytest.raises(UserError, match=r"mask '.*masks/image_2\.png' is 80x60 but its image image_2\.png is 80x64; "
                                        "a mask must have its image's size") as err:
        build(data, mask_dir=masks)
    assert "\n" not in str(err.value)
    with open(os.path.join(masks, "image_2.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(UserError, match=r"cannot read mask '.*masks/image_2\.png' \(.*\); re-save it as a grayscale PNG"):
        build(data, mask_dir=masks)
    with pytest.raises(UserError, match=r"--mask_dir '.*': none of the 3 images has a mask there"):
        build(data, mask_dir=str(tmp_path))
    with pytest.raises(UserError, match="is not a folder"):
        build(data, mask_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="is --train_data_dir itself"):
        build(data, mask_dir=data)


def _run_inputs(tmp_path, data, **flags):
    """The dataset a trainer would build from these command-line flags (parsed and checked, no model)."""
    from helpers import base_args
    from textual_inversion_core.cli import parse_args
    from textual_inversion_core.preflight import load_run_inputs

    argv = base_args(str(tmp_path / "no-model"), data, str(tmp_path / "out"), resolution=64, **flags)
    return load_run_inputs(parse_args(argv)).dataset


def test_masked_loss_with_alpha_mask_is_kohyas_alpha_masked_loss(tmp_path):
    """kohya documents --masked_loss --alpha_mask together; it is the alpha mask, exactly as --alpha_mask alone."""
    data = write_cutout(tmp_path / "data")
    paired = _run_inputs(tmp_path, data, masked_loss=True, alpha_mask=True)
    alone = _run_inputs(tmp_path, data, alpha_mask=True)
    assert paired.has_masks and alone.has_masks
    for flip in (False, True):
        weights = paired.pixel_mask(0, flip)
        assert (weights > 0.9).sum() > 50 and (weights < 0.1).sum() > 50  # the cutout, not all ones
        np.testing.assert_array_equal(weights, alone.pixel_mask(0, flip))


@pytest.mark.parametrize("flags, message", [
    (dict(masked_loss=True, alpha_mask=True, mask_dir="MASKS"), "--mask_dir and --alpha_mask are two sources"),
    (dict(alpha_mask=True, mask_dir="MASKS"), "--mask_dir and --alpha_mask are two sources"),
    (dict(masked_loss=True), "--masked_loss needs its masks: --mask_dir DIR"),
    (dict(mask_dir="MASKS"), "--mask_dir is only read with --masked_loss"),
])
def test_contradictory_or_incomplete_mask_flags_are_one_line_errors(masked_folder, tmp_path, flags, message):
    data, masks = masked_folder
    flags = {k: (masks if v == "MASKS" else v) for k, v in flags.items()}
    with pytest.raises(UserError, match=message) as err:
        _run_inputs(tmp_path, data, **flags)
    assert "\n" not in str(err.value)


def test_a_mask_folder_inside_the_data_folder_is_not_trained_on(masked_folder, tmp_path):
    data, masks = masked_folder
    inside = os.path.join(data, "masks")
    os.rename(masks, inside)
    dataset, messages = build(data, mask_dir=inside, recursive=True)
    assert sorted(os.path.basename(p) for p in dataset.image_paths) == ["image_0.png", "image_1.png", "image_2.png"]
    assert not any("left out" in m for m in messages)


def test_host_batch_carries_the_latent_weights(tmp_path):
    dataset, _ = build(write_cutout(tmp_path / "data"), alpha_mask=True, **BUCKETS)
    plan = run.RunPlan(2, 1, 1, len(dataset), 4, 1e-3)

    def encode(pixels):  # a stand-in VAE with factor 4
        return [p[:4, ::4, ::4] for p in pixels], [p[:4, ::4, ::4] for p in pixels]

    batch = run.host_batch(plan, dataset, run.LatentCache(dataset, encode), 3, 0, 0)
    assert batch["mask"].shape == (1, 2, 1) + batch["mean"].shape[-2:] and batch["mask"].dtype == np.float32
    key = dataset.latent_key(dataset.draw(0, 2))
    np.testing.assert_array_equal(batch["mask"][0, 0], dataset.latent_mask(key, batch["mean"].shape[-2:]))


# ---- The loss --------------------------------------------------------------------------------------------------

def random_pair(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_a_masked_out_region_contributes_no_gradient():
    prediction, target = random_pair((2, 4, 8, 8), 0)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :3] = 0  # the left three latent columns left out
    mask[1, :, 5:, 3:] = 0.5
    prediction.requires_grad_(True)
    loss = masked_mse(prediction, target, mask)
    (grad,) = torch.autograd.grad(loss, prediction)
    assert (grad[..., :3] == 0).all() and (grad[..., 3:] != 0).all()
    changed_prediction, changed_target = prediction.detach().clone(), target.clone()
    changed_prediction[..., :3] += 100
    changed_target[..., :3] -= 7
    assert masked_mse(changed_prediction, changed_target, mask).item() == loss.item()  # what is left out is not seen


def test_weights_are_normalised_per_example_so_processes_split_evenly():
    prediction, target = random_pair((4, 4, 8, 8), 1)
    mask = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    mask[2] *= 0.1  # very different weight sums per example
    whole = masked_mse(prediction, target, mask)
    halves = (masked_mse(prediction[:2], target[:2], mask[:2]) + masked_mse(prediction[2:], target[2:], mask[2:])) / 2
    torch.testing.assert_close(whole, halves, rtol=1e-6, atol=0)
    blank = mask.clone()
    blank[0] = 0  # an example masked out entirely: loss 0, the others unchanged
    torch.testing.assert_close(masked_mse(prediction, target, blank) * 4 / 3,
                               masked_mse(prediction[1:], target[1:], mask[1:]), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def tiny_models(tiny_pipeline):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from torch_backend.model import PlaceholderEmbedding

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    tokenizer.add_tokens(["<t>"])
    text_encoder = CLIPTextModel.from_pretrained(tiny_pipeline, subfolder="text_encoder").eval()
    text_encoder.resize_token_embeddings(len(tokenizer))
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline, subfolder="unet").eval()
    for module in (text_encoder, unet):
        module.requires_grad_(False)
    base = text_encoder.get_input_embeddings()
    token_id = tokenizer.convert_tokens_to_ids("<t>")
    embedding = PlaceholderEmbedding(base, [token_id], base.weight[tokenizer.encode("toy", add_special_tokens=False)])
    text_encoder.set_input_embeddings(embedding)
    ids = torch.tensor(tokenizer(["a photo of a <t>"] * 2, padding="max_length", max_length=77).input_ids)
    scheduler = DDPMScheduler.from_pretrained(tiny_pipeline, subfolder="scheduler")
    return text_encoder, unet, scheduler, embedding, ids


def loss_and_grad(models, latents, noise, timesteps, mask=None):
    text_encoder, unet, scheduler, embedding, ids = models
    embedding.vectors.grad = None
    loss = denoising_loss(text_encoder, unet, scheduler, latents, noise, timesteps, ids[: len(latents)], torch.float32,
                          mask=mask)
    loss.backward()
    return loss.detach(), embedding.vectors.grad.clone()


def test_all_ones_equals_the_plain_loss_through_the_models(tiny_models):
    latents, noise = random_pair((2, 4, 32, 32), 3)
    timesteps = torch.tensor([40, 700])
    plain = loss_and_grad(tiny_models, latents, noise, timesteps)
    ones = loss_and_grad(tiny_models, latents, noise, timesteps, torch.ones(2, 1, 32, 32))
    assert plain[1].abs().sum() > 0
    # The two losses sum the same 8192 squared errors in other orders: a few eps of the loss at most (blocked sums of
    # positive terms; measured equal on AVX-512, AVX2 and SSE kernels).
    assert_within_eps(ones[0].numpy(), plain[0].numpy(), 32, scale=plain[0].item(), what="all-ones vs plain loss")
    # Their gradients with respect to the prediction differ only by powers of two (1/8192 vs 1/2 x 1/4096), which
    # are exact, so the same backward runs on equal inputs: bit-identical on any CPU.
    assert torch.equal(ones[1], plain[1])


def test_a_masked_out_example_adds_no_gradient_through_the_models(tiny_models):
    latents, noise = random_pair((2, 4, 32, 32), 4)
    timesteps = torch.tensor([300, 500])
    mask = torch.ones(2, 1, 32, 32)
    mask[0] = 0
    _, with_blank = loss_and_grad(tiny_models, latents, noise, timesteps, mask)
    _, alone = loss_and_grad(tiny_models, latents[1:], noise[1:], timesteps[1:], mask[1:])
    # Batch 2 and batch 1 run other kernels, so the two gradients differ by rounding: measured up to 17 eps x the
    # gradient's norm (AVX-512, AVX2 and SSE kernels, 1 and 2 threads, 6 draws). A masked-out example that leaked
    # its gradient would move it by 0.2-0.7 x the norm (~3e6 eps), so 256 eps still fails on the smallest leak.
    assert_within_eps(with_blank.numpy(), (alone / 2).numpy(), 256, what="batch of 2, one masked out vs. batch of 1")
