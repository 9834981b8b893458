"""Bad input a user can give the PyTorch trainer: each ends in one clear line, exit code 2, and
nothing half-written in output_dir; awkward but valid images (modes, EXIF, size, names) train.

Input refused before any model is loaded is checked in this process, through textual_inversion.main:
it raises a UserError, which run_cli prints as one line with exit code 2 (checked end to end once, by
test_refusal_from_the_command_line_is_one_line), or argparse prints its line and exits with 2. Refusals
that need the model (its tokenizer, weights or width) run the script as users do."""

import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

import textual_inversion
from helpers import REPO, base_args, read_vectors, run_in_process, run_script, write_images
from textual_inversion_core.data import load_image
from textual_inversion_core.errors import UserError

PROG = "textual_inversion.py: error:"


def files_under(folder):
    """Every file below folder (relative paths); an absent folder has none."""
    found = set()
    for root, _, names in os.walk(folder):
        for name in names:
            found.add(os.path.relpath(os.path.join(root, name), folder))
    return found


def assert_names(line, *needles):
    assert line.startswith(PROG), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def assert_one_line_error(result, *needles):
    """A script run that ended with exit code 2, no traceback, exactly one error line (the last one) naming the problem."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    return assert_names(errors[0], *needles)


def refusal(argv, capsys, *needles):
    """The line a user sees when the trainer refuses argv, from main(argv) run in this process."""
    with pytest.raises((UserError, SystemExit)) as info:
        textual_inversion.main(argv)
    stderr = capsys.readouterr().err
    if isinstance(info.value, SystemExit):  # argparse: its own line, exit code 2
        assert info.value.code == 2, info.value.code
        assert len(stderr.splitlines()) == 1, stderr
        line = stderr.strip()
    else:  # run_cli prints this as the one error line and exits with 2
        message = str(info.value)
        assert message.strip() and "\n" not in message, message
        assert ": error:" not in stderr, stderr
        line = f"{PROG} {message}"
    return assert_names(line, *needles)


def bad_args(tiny_pipeline, data, out, **overrides):
    overrides.setdefault("report_to", "tensorboard")  # so a late failure would leave logs/ behind
    return base_args(tiny_pipeline, data, out, **overrides)


def run_bad(tiny_pipeline, data, out, **overrides):
    return run_script(bad_args(tiny_pipeline, data, out, **overrides), timeout=300)


def test_refusal_from_the_command_line_is_one_line(tiny_pipeline, train_images, tmp_path):
    """The script as users run it: run_cli prints the UserError as the only stderr line, exit code 2, no
    traceback, and the refused run created no output folder."""
    out = tmp_path / "out"
    result = run_bad(tiny_pipeline, train_images, str(out), num_vectors=0)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"{PROG} --num_vectors must be at least 1, got 0"], result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# The training-data folder


def test_train_data_dir_missing(tiny_pipeline, tmp_path, capsys):
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, str(tmp_path / "no-such-folder"), out), capsys,
            "--train_data_dir", "no-such-folder", "does not exist")
    assert files_under(out) == set()


def test_train_data_dir_is_a_file(tiny_pipeline, tmp_path, capsys):
    data = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(data)
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, str(data), out), capsys, "is a file, not a folder")
    assert files_under(out) == set()


def test_train_data_dir_empty(tiny_pipeline, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "subfolder").mkdir()
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, str(data), out), capsys, "contains no image files")
    assert files_under(out) == set()


def test_only_non_image_files(tiny_pipeline, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("not an image")
    (data / "labels.csv").write_text("a,b\n")
    (data / "photo").write_bytes(b"no extension, not an image either")
    (data / ".DS_Store").write_bytes(b"\0\1junk")
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, str(data), out), capsys, "contains no image files")
    assert files_under(out) == set()


def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["garbage", "truncated_jpeg", "truncated_png"])
def test_corrupt_image_is_named(tiny_pipeline, tmp_path, capsys, kind):
    data = write_images(tmp_path / "data", count=2)
    open(os.path.join(data, ".DS_Store"), "wb").write(b"\0\1junk")  # not an image: skipped, not named
    if kind == "garbage":
        bad = os.path.join(data, "broken.png")
        open(bad, "wb").write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    elif kind == "truncated_jpeg":
        bad = os.path.join(data, "cut off.jpg")
        _truncated_jpeg(bad)
    else:
        bad = os.path.join(data, "cut.png")
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
        content = open(bad, "rb").read()
        open(bad, "wb").write(content[: len(content) * 2 // 3])
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, data, out), capsys, "cannot read image", os.path.basename(bad), "--skip_bad_images")
    assert files_under(out) == set()


def test_skip_bad_images_trains_on_the_rest_with_a_warning(tiny_pipeline, tmp_path):
    data = write_images(tmp_path / "data", count=2)
    _truncated_jpeg(os.path.join(data, "cut off.jpg"))
    open(os.path.join(data, "broken.png"), "wb").write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    out = str(tmp_path / "out")
    result = run_in_process(base_args(tiny_pipeline, data, out, max_train_steps=1, skip_bad_images=True))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "skipping unreadable image" in line]
    assert len(warnings) == 2 and any("cut off.jpg" in w for w in warnings) and any("broken.png" in w for w in warnings)
    assert "images = 2," in result.stderr
    assert os.path.isfile(os.path.join(out, "learned_embeds.safetensors"))


def test_every_image_unreadable_even_with_skip(tiny_pipeline, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (data / "b.jpg").write_bytes(b"\xff\xd8\xffbroken")
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, str(data), out, skip_bad_images=True), capsys, "could be read")
    assert files_under(out) == set()


def test_decompression_bomb_is_refused_by_name(tiny_pipeline, tmp_path, capsys):
    """A PNG header claiming 30000x30000 pixels: refused before decoding, with the file named."""
    data = write_images(tmp_path / "data", count=1)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    open(os.path.join(data, "bomb.png"), "wb").write(bomb)
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, data, out), capsys, "cannot read image", "bomb.png")
    assert files_under(out) == set()


# --------------------------------------------------------------------------------------------------
# Awkward but valid images: decoded correctly (checked pixel by pixel), and a run over all of them trains


def _uniform(mode, value, size=(40, 24)):
    return Image.new(mode, size, value)


def _palette_image(colour):
    image = Image.new("P", (40, 24))
    image.putpalette(list(colour) + [0, 0, 0] * 255)
    return image


def _save_valid_images(folder):
    """{file name: expected RGB of the uniform decoded image}, written into folder."""
    os.makedirs(folder, exist_ok=True)
    expected = {}

    def save(name, image, rgb, **kwargs):
        image.save(os.path.join(folder, name), **kwargs)
        expected[name] = rgb

    save("mode L.png", _uniform("L", 100), (100, 100, 100))
    save("mode LA half alpha.png", _uniform("LA", (100, 128)), (177, 177, 177))  # over white
    save("mode P.png", _palette_image((10, 200, 30)), (10, 200, 30))
    transparent = _palette_image((10, 200, 30))
    transparent.info["transparency"] = 0
    save("mode P transparent.png", transparent, (255, 255, 255), transparency=0)
    save("mode RGBA opaque.png", _uniform("RGBA", (200, 10, 10, 255)), (200, 10, 10))
    save("mode RGBA clear.png", _uniform("RGBA", (200, 10, 10, 0)), (255, 255, 255))
    save("mode CMYK.tif", _uniform("CMYK", (0, 255, 255, 0)), (255, 0, 0))
    save("mode CMYK.jpg", _uniform("CMYK", (0, 255, 255, 0)), (255, 0, 0), quality=100)
    sixteen = Image.fromarray(np.full((24, 40), 40000, dtype=np.uint16))
    save("16-bit ümlaut 猫.png", sixteen, (156, 156, 156))  # 40000/65535*255, scaled not clipped
    save("spaces and ñ.jpg", _uniform("RGB", (30, 60, 90)), (30, 60, 90), quality=100)
    return expected


def test_image_modes_decode_to_the_right_colours(tmp_path):
    expected = _save_valid_images(str(tmp_path))
    reopened = {name: Image.open(tmp_path / name).mode for name in expected}
    assert reopened["16-bit ümlaut 猫.png"].startswith("I"), reopened  # really a 16-bit file
    assert reopened["mode CMYK.jpg"] == "CMYK" and reopened["mode LA half alpha.png"] == "LA"
    for name, rgb in expected.items():
        pixels = load_image(str(tmp_path / name), 16, center_crop=False)
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
        tolerance = 3 if name.endswith(".jpg") else 1
        assert np.abs(pixels.astype(int) - np.array(rgb)).max() <= tolerance, (name, pixels[0, 0], rgb)


def _exif_rotated_jpeg(path):
    """Stored 64 wide x 32 high, top half red, bottom half blue; EXIF orientation 6 (rotate 90 CW)."""
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:16] = (255, 0, 0)
    stored[16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, format="JPEG", quality=100, exif=exif.tobytes())


def test_exif_orientation_is_honoured(tmp_path):
    path = str(tmp_path / "rotated.jpg")
    _exif_rotated_jpeg(path)
    pixels = load_image(path, 32, center_crop=False).astype(int)
    # Turned 90 degrees clockwise for display: the red top is now the right side, blue on the left.
    left, right = pixels[:, :12].reshape(-1, 3).mean(0), pixels[:, -12:].reshape(-1, 3).mean(0)
    assert left[2] > 200 and left[0] < 50, left
    assert right[0] > 200 and right[2] < 50, right
    with Image.open(path) as raw:  # without the EXIF turn, the top would be red
        assert np.asarray(raw)[0, 0, 0] > 200


def test_awkward_valid_folder_trains(tiny_pipeline, tmp_path):
    """Every mode above, EXIF, spaces and non-ASCII names, plus a stray text file and a .DS_Store: all
    images train, the other files are skipped."""
    data = str(tmp_path / "données d'entraînement")
    expected = _save_valid_images(data)
    _exif_rotated_jpeg(os.path.join(data, "rotated.jpg"))
    open(os.path.join(data, "notes.txt"), "w").write("not an image")
    open(os.path.join(data, ".DS_Store"), "wb").write(b"\0\1junk")
    out = str(tmp_path / "sortie ü")
    result = run_in_process(base_args(tiny_pipeline, data, out, max_train_steps=3, train_batch_size=4))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"images = {len(expected) + 1}," in result.stderr
    assert "notes.txt" in result.stderr  # the skipped file is named in a warning
    assert np.isfinite(read_vectors(os.path.join(out, "learned_embeds.safetensors"))).all()


_PEAK_RSS_OF_DECODE = r"""
import resource, sys
sys.path.insert(0, {repo!r})
from textual_inversion_core.data import load_image
import numpy, PIL.Image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = load_image({path!r}, 64, center_crop=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert pixels.shape == (64, 64, 3)
print(before, after, pixels.reshape(-1, 3).mean(0).round().tolist())
"""


@pytest.mark.slow
def test_huge_jpeg_decodes_in_little_memory(tmp_path):
    """An 8000x8000 JPEG (192 MB of RGB once decoded) must be decoded at a reduced size."""
    path = str(tmp_path / "huge.jpg")
    make = (f"from PIL import Image; g = Image.linear_gradient('L').resize((8000, 8000)); "
            f"Image.merge('RGB', (g, g.transpose(Image.Transpose.ROTATE_90), g.point(lambda v: 255 - v)))"
            f".save({path!r}, quality=90)")
    subprocess.run([sys.executable, "-c", make], check=True)
    with Image.open(path) as image:
        assert image.size == (8000, 8000)
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_DECODE.format(repo=REPO, path=path)],
                            capture_output=True, text=True, check=True)
    before_kb, after_kb, mean = result.stdout.split(maxsplit=2)
    growth_mb = (int(after_kb) - int(before_kb)) / 1024
    print(f"peak RSS growth decoding 8000x8000 JPEG at --resolution 64: {growth_mb:.1f} MB")
    assert growth_mb < 64, growth_mb  # the full decode alone would be 183 MB
    assert "127" in mean or "128" in mean  # content survived: a gradient averages to mid-grey


# --------------------------------------------------------------------------------------------------
# Tokens


def test_placeholder_token_already_in_vocabulary(tiny_pipeline, train_images, tmp_path):
    out = str(tmp_path / "out")
    result = run_bad(tiny_pipeline, train_images, out, placeholder_token="cat")
    assert_one_line_error(result, "--placeholder_token 'cat'", "already in the tokenizer's vocabulary")
    assert files_under(out) == set()


@pytest.mark.parametrize("token, pieces", [("toy qzxvkjwplm", "its word 'qzxvkjwplm' is 8 tokens"), ("qzxvkjwplm", "tokens ("),
                                           ("<cat-toy>", "tokens (")])
def test_initializer_not_one_token(tiny_pipeline, train_images, tmp_path, token, pieces):
    out = str(tmp_path / "out")
    result = run_bad(tiny_pipeline, train_images, out, initializer_token=token)
    assert_one_line_error(result, f"--initializer_token {token!r}", pieces, "single token")
    assert files_under(out) == set()


def test_initializer_empty(tiny_pipeline, train_images, tmp_path, capsys):
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, train_images, out, initializer_token=" "), capsys, "--initializer_token is empty")
    assert files_under(out) == set()


# --------------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("flag, value, needle", [
    ("num_vectors", 0, "--num_vectors must be at least 1, got 0"),
    ("resolution", 100, "--resolution 100 is not a multiple of 8; use 96 or 104"),
    ("train_batch_size", 0, "--train_batch_size must be at least 1, got 0"),
    ("lr_scheduler", "cosine_annealing", "--lr_scheduler: invalid choice: 'cosine_annealing'"),
    ("mixed_precision", "fp8", "--mixed_precision: invalid choice"),
    ("max_train_steps", "ten", "--max_train_steps: invalid int value"),
    ("learning_rate", "nan", "--learning_rate must be 0 or more"),
    ("learning_rate", "1e39", "--learning_rate must be 0 or more and at most 1e30"),
    ("learning_rate", "-1e-4", "--learning_rate must be 0 or more"),
    ("learning_rate", "inf", "--learning_rate must be 0 or more"),
    ("logging_steps", 0, "--logging_steps must be at least 1, got 0"),
])
def test_bad_flag_value(tiny_pipeline, train_images, tmp_path, capsys, flag, value, needle):
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, train_images, out, **{flag: value}), capsys, needle)
    assert not os.path.exists(out)  # flags are checked before anything touches the disk


def test_xformers_where_it_cannot_run(tiny_pipeline, train_images, tmp_path, capsys):
    """No xformers package (or no CUDA GPU) here: refused before any model is loaded."""
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, train_images, out, enable_xformers_memory_efficient_attention=True), capsys,
            "--enable_xformers_memory_efficient_attention needs")
    assert files_under(out) == set()


def test_wandb_on_a_machine_that_never_logged_in(tiny_pipeline, train_images, tmp_path, capsys, monkeypatch):
    """--report_to wandb with an empty HOME and no W&B variables: one line before any model, not wandb's traceback."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR",
                 "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    refusal(bad_args(tiny_pipeline, train_images, out, report_to="wandb"), capsys,
            "--report_to wandb has no login on this machine", "wandb login", "WANDB_MODE=offline")
    assert files_under(out) == set()


@pytest.mark.parametrize("kind", ["empty_folder", "folder_of_other_files", "a_file", "missing_offline"])
def test_model_path_not_a_pipeline(tiny_pipeline, train_images, tmp_path, kind):
    model = tmp_path / "model"
    if kind == "empty_folder":
        model.mkdir()
    elif kind == "folder_of_other_files":
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "pytorch_model.bin").write_bytes(b"\0" * 10)
    elif kind == "a_file":
        model.write_text("not a model")
    else:
        model = tmp_path / "no" / "such-model"
    out = str(tmp_path / "out")
    result = run_bad(str(model), train_images, out)
    assert_one_line_error(result, str(model))
    assert files_under(out) == set()


def test_model_folder_with_damaged_weights(tiny_pipeline, train_images, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = str(tmp_path / "out")
    assert_one_line_error(run_bad(str(model), train_images, out), "cannot load the model")
    assert files_under(out) == set()


# --------------------------------------------------------------------------------------------------
# Resume and output folder


@pytest.fixture(scope="module")
def completed_run(tiny_pipeline, train_images, tmp_path_factory):
    """A finished 2-step run with checkpoint-1 and checkpoint-2; tests damage copies of it."""
    out = str(tmp_path_factory.mktemp("completed") / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, max_train_steps=2, checkpointing_steps=1))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy_of(completed_run, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(completed_run, out)
    return out


def test_resume_from_missing_checkpoint(tiny_pipeline, train_images, completed_run, tmp_path, capsys):
    out = _copy_of(completed_run, tmp_path)
    before = files_under(out)
    argv = bad_args(tiny_pipeline, train_images, out, resume_from_checkpoint="checkpoint-1500", max_train_steps=4)
    line = refusal(argv, capsys, "--resume_from_checkpoint 'checkpoint-1500' not found")
    assert "checkpoint-1, checkpoint-2" in line  # says what is there
    assert files_under(out) == before


def _damage_checkpoint(out, damage):
    """Damage out/checkpoint-2; returns the --resume_from_checkpoint value that picks it."""
    ckpt = os.path.join(out, "checkpoint-2")
    tensors, state = os.path.join(ckpt, "training_state.safetensors"), os.path.join(ckpt, "training_state.json")
    if damage == "garbage_tensors":
        open(tensors, "wb").write(b"\xff" * 64)
    elif damage == "truncated_tensors":
        content = open(tensors, "rb").read()
        open(tensors, "wb").write(content[: len(content) // 2])
    elif damage == "no_json":
        os.unlink(state)
    elif damage == "bad_json":
        open(state, "w").write('{"step": 2, "seed":')
    else:
        from safetensors.numpy import save_file

        save_file({"vectors": np.zeros((1, 7), np.float32)}, tensors)
    return "checkpoint-2" if damage == "no_json" else "latest"


@pytest.mark.parametrize("damage", ["garbage_tensors", "truncated_tensors", "no_json", "bad_json"])
def test_resume_from_corrupt_checkpoint(tiny_pipeline, train_images, completed_run, tmp_path, capsys, damage):
    out = _copy_of(completed_run, tmp_path)
    spec = _damage_checkpoint(out, damage)
    before = files_under(out)
    refusal(bad_args(tiny_pipeline, train_images, out, resume_from_checkpoint=spec, max_train_steps=4), capsys,
            "checkpoint-2")
    assert files_under(out) == before


def test_resume_from_checkpoint_of_another_width(tiny_pipeline, train_images, completed_run, tmp_path):
    """Vectors 7 wide where the text encoder is 32: found once the model is loaded, still one line."""
    out = _copy_of(completed_run, tmp_path)
    spec = _damage_checkpoint(out, "wrong_shape")
    before = files_under(out)
    result = run_bad(tiny_pipeline, train_images, out, resume_from_checkpoint=spec, max_train_steps=4)
    assert_one_line_error(result, "checkpoint-2")
    assert files_under(out) == before


def _start_embedding(tmp_path, kind):
    """Path of a --init_from file of the given kind ("missing": a path with no file)."""
    from safetensors.numpy import save_file

    path = str(tmp_path / "start.safetensors")
    vectors = {"nan": np.full((1, 32), np.nan, np.float32), "wrong_count": np.zeros((2, 32), np.float32),
               "wrong_width": np.zeros((1, 7), np.float32)}.get(kind)
    if vectors is not None:
        save_file({"<old>": vectors}, path)
    return path


@pytest.mark.parametrize("kind, needle", [("missing", "does not exist"), ("nan", "NaN or infinite"),
                                          ("wrong_count", "pass --num_vectors 2")])
def test_init_from_bad_embedding(tiny_pipeline, train_images, tmp_path, capsys, kind, needle):
    out = str(tmp_path / "out")
    argv = bad_args(tiny_pipeline, train_images, out, init_from=_start_embedding(tmp_path, kind))
    refusal(argv, capsys, "--init_from" if kind != "missing" else "start.safetensors", needle)
    assert files_under(out) == set()


def test_init_from_of_another_width(tiny_pipeline, train_images, tmp_path):
    """A 7-wide embedding for a 32-wide text encoder: found once the model is loaded, still one line."""
    out = str(tmp_path / "out")
    result = run_bad(tiny_pipeline, train_images, out, init_from=_start_embedding(tmp_path, "wrong_width"))
    assert_one_line_error(result, "--init_from", "width 7")
    assert files_under(out) == set()


def test_output_dir_under_a_regular_file(tiny_pipeline, train_images, tmp_path, capsys):
    """As root every folder is writable, so make the path impossible: its parent is a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = str(blocker / "out")
    refusal(bad_args(tiny_pipeline, train_images, out), capsys, "--output_dir", "not writable")
    assert blocker.read_text() == "x"


def test_output_dir_is_a_file(tiny_pipeline, train_images, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("x")
    refusal(bad_args(tiny_pipeline, train_images, str(out)), capsys, "--output_dir", "not writable")
    assert out.read_text() == "x"


def _make_unwritable(folder):
    """Make an existing folder refuse new files for this process; True if that worked.

    chmod is enough for a normal user; root ignores permissions, so root sets the immutable flag.
    """
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        return False
    try:
        open(os.path.join(folder, "probe"), "w").close()
    except OSError:
        return True
    os.unlink(os.path.join(folder, "probe"))
    return False


def _make_writable(folder):
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    os.chmod(folder, 0o755)


def test_output_dir_not_writable(tiny_pipeline, train_images, tmp_path, capsys):
    """An existing read-only (immutable, as root) folder; where chattr is refused, a folder under a file."""
    out = tmp_path / "readonly"
    out.mkdir()
    try:
        if not _make_unwritable(out):
            (tmp_path / "a-file").write_text("x")
            out = tmp_path / "a-file" / "out"
        refusal(bad_args(tiny_pipeline, train_images, str(out)), capsys, "--output_dir", "not writable")
    finally:
        if out.is_dir():
            _make_writable(out)
    assert files_under(out) == set()


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("flags", [dict(validation_split=0.25), dict(eval_clip_model="some/clip")])
def test_step_scoring_on_a_flow_family_is_refused_before_any_model_loads(family, flags, tiny_sd3_pipeline,
                                                                         tiny_flux_pipeline, train_images, tmp_path,
                                                                         capsys, no_model_loading):
    """Held-out loss and CLIP scores are SD-1.x/2.x and SDXL only for now: a flow run asking for them stops in one
    line naming the flag and the family, before any model loads."""
    pipeline = tiny_sd3_pipeline if family == "sd3" else tiny_flux_pipeline
    line = refusal(bad_args(pipeline, train_images, str(tmp_path / "out"), **flags), capsys, "does not score")
    assert next(iter(flags)) in line and ("SD3" if family == "sd3" else "Flux.1") in line
