"""Loading for the Flax trainer: PyTorch safetensors/.bin and Flax weights, transformers 4 and 5
layouts, and the check that no parameter is left at its random initialisation."""

import json
import os
import shutil

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from flax_backend import model as flax_model
from flax_backend import weights as flax_weights
from textual_inversion_core.errors import UserError

TOKEN_EMBEDDING = ("text_model", "embeddings", "token_embedding", "embedding")


def _load(folder, name):
    import jax.numpy as jnp

    return flax_weights.load_component(folder, name, None, jnp.float32)


def _file_tensor(path, suffix):
    from safetensors.numpy import load_file

    state = load_file(path)
    (key,) = [k for k in state if k.endswith(suffix)]
    return state[key]


def test_pytorch_safetensors_convert_with_every_parameter(tiny_pipeline):
    for name in ("text_encoder", "unet", "vae"):
        _, params, note = _load(tiny_pipeline, name)
        assert note == "PyTorch safetensors converted"
        assert all(np.isfinite(v).all() for v in flatten_dict(params).values())
    _, te, _ = _load(tiny_pipeline, "text_encoder")
    stored = _file_tensor(os.path.join(tiny_pipeline, "text_encoder", "model.safetensors"), "token_embedding.weight")
    np.testing.assert_array_equal(flatten_dict(te)[TOKEN_EMBEDDING], stored)
    _, unet, _ = _load(tiny_pipeline, "unet")
    conv = _file_tensor(os.path.join(tiny_pipeline, "unet", "diffusion_pytorch_model.safetensors"), "conv_in.weight")
    np.testing.assert_array_equal(unet["conv_in"]["kernel"], conv.transpose(2, 3, 1, 0))  # OIHW -> HWIO


def test_transformers5_layout_loads_the_real_weights(tiny_pipeline, transformers5_pipeline):
    """transformers 5 drops `text_model.`; transformers 4.57's own from_pt then keeps random weights.
    Our loader adds the prefix back, and the loaded matrix is the file's."""
    from transformers import FlaxCLIPTextModel

    file_matrix = _file_tensor(os.path.join(transformers5_pipeline, "text_encoder", "model.safetensors"),
                               "token_embedding.weight")
    # The trap exists in this environment: the library loader silently initialises randomly.
    library = FlaxCLIPTextModel.from_pretrained(os.path.join(transformers5_pipeline, "text_encoder"), from_pt=True)
    library_matrix = np.asarray(flatten_dict(library.params)[TOKEN_EMBEDDING])
    assert not np.allclose(library_matrix, file_matrix)

    _, params, note = _load(transformers5_pipeline, "text_encoder")
    assert "prefix added" in note
    _, reference, _ = _load(tiny_pipeline, "text_encoder")
    np.testing.assert_array_equal(flatten_dict(params)[TOKEN_EMBEDDING], file_matrix)
    for key, value in flatten_dict(reference).items():
        np.testing.assert_array_equal(flatten_dict(params)[key], value, err_msg="/".join(key))


def test_pytorch_bin_weights_load_like_safetensors(tiny_pipeline, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = str(tmp_path / "bin-pipeline")
    shutil.copytree(tiny_pipeline, folder)
    unet_dir = os.path.join(folder, "unet")
    torch.save(load_file(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")),
               os.path.join(unet_dir, "diffusion_pytorch_model.bin"))
    os.unlink(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))
    _, from_bin, note = _load(folder, "unet")
    assert note == "PyTorch bin converted"
    _, from_safetensors, _ = _load(tiny_pipeline, "unet")
    for key, value in flatten_dict(from_safetensors).items():
        np.testing.assert_array_equal(flatten_dict(from_bin)[key], value)


def test_missing_tensor_is_named_not_initialised(tiny_pipeline, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = str(tmp_path / "incomplete")
    shutil.copytree(tiny_pipeline, folder)
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    dropped = next(k for k in state if k.endswith("conv_out.weight"))
    del state[dropped]
    save_file(state, path)
    with pytest.raises(UserError, match=r"1 of \d+ parameters are not in the checkpoint \(conv_out/kernel\)"):
        _load(folder, "unet")


def test_foreign_tensor_is_refused(tiny_pipeline, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = str(tmp_path / "extra")
    shutil.copytree(tiny_pipeline, folder)
    path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["class_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)
    save_file(state, path)
    with pytest.raises(UserError, match="class_embedding.linear_1.weight"):
        _load(folder, "vae")


def test_unet_setting_the_flax_unet_cannot_compute_is_refused(tiny_pipeline, tmp_path):
    """diffusers' Flax UNet always uses 32 GroupNorm groups: a UNet saved with 16 would load every weight
    and still compute another network (seen: loss 1.35 in Flax vs 0.75 in PyTorch on the same inputs)."""
    folder = str(tmp_path / "groups")
    shutil.copytree(tiny_pipeline, folder)
    config_path = os.path.join(folder, "unet", "config.json")
    config = json.load(open(config_path))
    assert config["norm_num_groups"] == 32
    _load(folder, "unet")  # the stored defaults pass
    config.update(norm_num_groups=16, act_fn="gelu")
    json.dump(config, open(config_path, "w"))
    with pytest.raises(UserError, match=r"norm_num_groups=16 \(Flax always uses 32\), act_fn='gelu'.*"
                                        r"textual_inversion\.py") as err:
        _load(folder, "unet")
    assert "\n" not in str(err.value)


def test_noise_schedule_comes_from_the_model_config(tiny_pipeline, tmp_path):
    folder = str(tmp_path / "vpred")
    shutil.copytree(tiny_pipeline, folder)
    config_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    config = json.load(open(config_path))
    config.update(prediction_type="v_prediction", beta_start=0.001, beta_end=0.02, beta_schedule="linear")
    json.dump(config, open(config_path, "w"))
    scheduler, state, _ = flax_weights.noise_schedule(folder)
    assert scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(np.asarray(state.common.betas)[[0, -1]], [0.001, 0.02], rtol=1e-6)

    config["prediction_type"] = "sample"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(UserError, match="only epsilon and v_prediction"):
        flax_weights.noise_schedule(folder)
    config.update(prediction_type="epsilon", rescale_betas_zero_snr=True)
    json.dump(config, open(config_path, "w"))
    with pytest.raises(UserError, match="rescale_betas_zero_snr"):
        flax_weights.noise_schedule(folder)


def test_example_keys_keep_all_64_seed_bits():
    import jax

    from textual_inversion_core.data import STREAM_NOISE, example_seed

    seeds = [example_seed(7, i, STREAM_NOISE) for i in range(4)] + [2**62 + 5, 5]
    with jax.enable_x64(True):
        for seed in seeds:
            np.testing.assert_array_equal(flax_model.raw_prng_key(seed), np.asarray(jax.random.PRNGKey(seed)))
    # Seeds that differ only in their high word give different keys (PRNGKey without x64 would not).
    assert not np.array_equal(flax_model.raw_prng_key(2**40 + 1), flax_model.raw_prng_key(1))


def test_sharded_safetensors_load_like_one_file(tiny_pipeline, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = str(tmp_path / "sharded")
    shutil.copytree(tiny_pipeline, folder)
    te_dir = os.path.join(folder, "text_encoder")
    state = load_file(os.path.join(te_dir, "model.safetensors"))
    os.unlink(os.path.join(te_dir, "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, os.path.join(te_dir, name))
    with open(os.path.join(te_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    _, sharded, _ = _load(folder, "text_encoder")
    _, single, _ = _load(tiny_pipeline, "text_encoder")
    assert flatten_dict(sharded).keys() == flatten_dict(single).keys()
    for key, value in flatten_dict(single).items():
        np.testing.assert_array_equal(flatten_dict(sharded)[key], value)


def test_weight_choice_prefers_flax_then_safetensors_then_bin():
    assert flax_weights._weight_choice({"diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"}, None) \
        == ("flax", ["diffusion_flax_model.msgpack"])
    assert flax_weights._weight_choice({"pytorch_model.bin", "model.safetensors"}, None) == ("safetensors", ["model.safetensors"])
    assert flax_weights._weight_choice({"model.fp16.safetensors", "model.safetensors"}, "fp16") \
        == ("safetensors", ["model.fp16.safetensors"])
    assert flax_weights._weight_choice({"pytorch_model.bin"}, None) == ("bin", ["pytorch_model.bin"])
    assert flax_weights._weight_choice({"config.json"}, None) is None


def test_unreachable_hub_id_is_one_clear_error(tmp_path, train_images):
    from helpers import FLAX_SCRIPT, flax_base_args, run_script

    argv = flax_base_args("nobody-here/no-such-model", train_images, str(tmp_path / "out"))
    # run_script runs offline (HF_HUB_OFFLINE=1); an empty HF_HOME holds no cached copy either.
    proc = run_script(argv, FLAX_SCRIPT, env={"HF_HOME": str(tmp_path / "hf-home")}, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("textual_inversion_flax.py: error: cannot load the model 'nobody-here/no-such-model'")
