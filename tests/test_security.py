"""Secrets never reach disk or logs; pickle files are read with weights_only=True; the push leaves
resumable state and logs behind."""

import os
import pathlib
import re
import subprocess

import pytest
import torch

from conftest import REPO, base_args, run_script
from helpers import run_in_process
from textual_inversion_core import hub
from textual_inversion_core.cli import parse_args

FLAG_TOKEN = "hf_FlagSecretDoNotWrite0123456789abcdef"
ENV_TOKEN = "hf_EnvSecretDoNotWrite9876543210fedcba"


def files_containing(folder, secrets):
    """{relative path: [secrets found]} over every file below folder, read as bytes (binary files too)."""
    hits = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            data = open(path, "rb").read()
            found = [s for s in secrets if s.encode() in data or s.encode("utf-16-le") in data]
            if found:
                hits[os.path.relpath(path, folder)] = found
    return hits


@pytest.mark.slow
def test_hub_token_and_hf_token_never_reach_disk_or_logs(tiny_pipeline, train_images, tmp_path):
    out = str(tmp_path / "out")
    argv = base_args(tiny_pipeline, train_images, out, hub_token=FLAG_TOKEN, report_to="tensorboard",
                     max_train_steps=2, checkpointing_steps=1, save_steps=1, save_as_full_pipeline=True,
                     validation_prompt="a photo of <cat-toy>", validation_steps=2, num_validation_images=1)
    result = run_script(argv, env={"HF_TOKEN": ENV_TOKEN})
    assert result.returncode == 0, result.stderr[-3000:]
    written = [os.path.join(r, n) for r, _, ns in os.walk(out) for n in ns]
    # The run wrote what a token could leak into: TensorBoard events and hparams, checkpoints, pipeline.
    for pattern in ("events.out.tfevents", "hparams.yml", "training_state.json", "model_index.json",
                    "validation/step-"):
        assert any(pattern in path for path in written), pattern
    hparams = next(p for p in written if p.endswith("hparams.yml"))
    assert "learning_rate" in open(hparams).read()  # the settings are logged, only the secret is not
    assert files_containing(out, [FLAG_TOKEN, ENV_TOKEN]) == {}
    assert FLAG_TOKEN not in result.stdout + result.stderr and ENV_TOKEN not in result.stdout + result.stderr


def test_failed_push_preflight_does_not_echo_the_token(tiny_pipeline, train_images, tmp_path):
    out = str(tmp_path / "out")
    argv = base_args(tiny_pipeline, train_images, out, hub_token=FLAG_TOKEN, push_to_hub=True, max_train_steps=1)
    result = run_script(argv, env={"HF_TOKEN": ENV_TOKEN})  # offline: the Hub cannot be reached
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--push_to_hub" in result.stderr.strip().splitlines()[-1]
    assert FLAG_TOKEN not in result.stdout + result.stderr and ENV_TOKEN not in result.stdout + result.stderr
    assert files_containing(out, [FLAG_TOKEN, ENV_TOKEN]) == {}


def test_model_card_and_public_config_leave_the_token_out(tmp_path):
    from textual_inversion_core.cli import public_config

    args = parse_args(["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--placeholder_token=<t>",
                       "--initializer_token=x", f"--hub_token={FLAG_TOKEN}", "--push_to_hub"])
    assert FLAG_TOKEN not in repr(public_config(args))
    path = hub.write_model_card(str(tmp_path), "user/repo", args)
    assert FLAG_TOKEN not in open(path).read()


class _WritesAFileWhenUnpickled:
    """A pickle payload: unpickling calls open(marker, "w"), i.e. runs code chosen by the file's author."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_embedding(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = str(tmp_path / "learned_embeds.bin")
    torch.save({"<cat-toy>": _WritesAFileWhenUnpickled(marker)}, path)
    return path, marker


def test_the_malicious_pickle_is_live(tmp_path):
    """Control: without weights_only the payload really runs (so the refusals below mean something)."""
    path, marker = _malicious_embedding(tmp_path)
    loaded = torch.load(path, weights_only=False)
    loaded["<cat-toy>"].close()
    assert os.path.exists(marker)


def test_malicious_pickle_is_refused_by_the_reader(tmp_path):
    from textual_inversion_core.embeddings import read_embedding
    from textual_inversion_core.errors import UserError

    path, marker = _malicious_embedding(tmp_path)
    with pytest.raises(UserError, match="safely"):
        read_embedding(path)
    assert not os.path.exists(marker)


def test_malicious_init_from_is_refused_by_the_trainer(tiny_pipeline, train_images, tmp_path):
    path, marker = _malicious_embedding(tmp_path)
    out = str(tmp_path / "out")
    result = run_script(base_args(tiny_pipeline, train_images, out, init_from=path))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("textual_inversion.py: error:") and "learned_embeds.bin" in last
    assert not os.path.exists(marker)


def test_every_torch_load_in_the_project_is_weights_only():
    """Static guard: each torch.load call in the shipped Python files (not tests/, whose control case above
    unpickles on purpose) passes weights_only=True; no raw pickle."""
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    files = [f for f in listed.stdout.split() if f and not f.startswith("tests/")]
    assert "textual_inversion.py" in files and "textual_inversion_core/embeddings.py" in files
    offenders, inspected = [], 0
    for rel in files:
        source = pathlib.Path(REPO, rel).read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", source):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(source)):  # the call's closing parenthesis
                depth += {"(": 1, ")": -1}.get(source[end], 0)
                if depth == 0:
                    break
            inspected += 1
            if "weights_only=True" not in source[match.start():end]:
                offenders.append(f"{rel}:{source.count(chr(10), 0, match.start()) + 1}")
        for risky in ("pickle.load(", "pickle.loads(", "allow_pickle=True"):
            if risky in source:
                offenders.append(f"{rel}: {risky}")
    assert inspected >= 1  # embeddings.py reads .bin/.pt: the scan must have seen it
    assert offenders == []


def test_push_leaves_out_checkpoints_logs_and_temporaries(tiny_pipeline, train_images, tmp_path):
    """What upload_folder would send, filtered exactly as huggingface_hub filters it (UPLOAD_IGNORE)."""
    from huggingface_hub.utils import filter_repo_objects

    out = str(tmp_path / "out")
    result = run_in_process(base_args(tiny_pipeline, train_images, out, max_train_steps=2, checkpointing_steps=1,
                                      save_steps=1, report_to="tensorboard"))
    assert result.returncode == 0, result.stderr[-3000:]
    # What a crash or an interrupted save can leave next to the results.
    os.makedirs(os.path.join(out, ".tmp-checkpoint-3-abc"))
    open(os.path.join(out, ".tmp-checkpoint-3-abc", "training_state.json"), "w").write("{}")
    open(os.path.join(out, ".tmp-learned_embeds.safetensors-xyz"), "wb").write(b"partial")
    files = sorted(p.relative_to(out).as_posix() for p in pathlib.Path(out).glob("**/*") if p.is_file())
    assert any(f.startswith("checkpoint-") for f in files) and any(f.startswith("logs/") for f in files)
    uploaded = sorted(filter_repo_objects(files, ignore_patterns=hub.UPLOAD_IGNORE))
    results = ["cat-toy.pt", "cat-toy.safetensors", "learned_embeds.bin", "learned_embeds.safetensors",
               "token_identifier.txt", "type_of_concept.txt"]
    assert set(results) <= set(uploaded), uploaded
    left_out = [f for f in uploaded if f.startswith(("checkpoint-", "logs/", "learned_embeds-steps-", ".tmp-"))]
    assert left_out == [] and not any("/.tmp-" in f for f in uploaded), uploaded
