"""The run logic both trainers share (textual_inversion_core.run, tokens, trackers), in process and fast."""

import logging
import signal
import sys

import numpy as np
import pytest

from textual_inversion_core import run
from textual_inversion_core.cli import parse_args
from textual_inversion_core.errors import UserError
from textual_inversion_core.preflight import RunInputs
from textual_inversion_core.schedules import lr_table
from textual_inversion_core.trackers import select_trackers


def flags_argv(**overrides):
    return ["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--placeholder_token=<t>",
            "--initializer_token=toy"] + [f"--{k}={v}" for k, v in overrides.items()]


def flags(**overrides):
    return parse_args(flags_argv(**overrides))


def test_plan_follows_diffusers_step_arithmetic():
    args = flags(train_batch_size=3, gradient_accumulation_steps=2, num_train_epochs=2,
                 learning_rate=1e-3, validation_prompt="x", validation_epochs=1)
    args.max_train_steps = None  # diffusers: epochs decide when --max_train_steps is not given
    plan = run.make_plan(args, num_examples=100, num_devices=4)
    assert plan.micro_batch == 12 and plan.global_batch == 24
    assert plan.steps_per_epoch == 5  # ceil(100 / 24)
    assert plan.max_train_steps == 10
    assert plan.validation_steps == 5  # --validation_epochs converted to steps
    assert plan.learning_rate == 1e-3
    scaled = run.make_plan(parse_args(flags_argv(train_batch_size=3, gradient_accumulation_steps=2,
                                                 learning_rate=1e-3) + ["--scale_lr"]), 100, 4)
    assert scaled.learning_rate == pytest.approx(1e-3 * 3 * 2 * 4)
    assert run.make_plan(flags(validation_steps=7), 10, 1).validation_steps == 0  # no prompt: no validation


@pytest.mark.parametrize("devices, batch, accumulation", [(1, 4, 1), (2, 2, 1), (4, 1, 2), (3, 2, 3)])
def test_devices_together_draw_exactly_the_single_device_examples(devices, batch, accumulation):
    """The union over devices of each micro-batch is the one-device micro-batch, in order."""
    many = run.RunPlan(batch, devices, accumulation, 40, 5, 1.0)
    one = run.RunPlan(batch * devices, 1, accumulation, 40, 5, 1.0)
    for step in range(5):
        for micro in range(accumulation):
            joined = [i for d in range(devices) for i in many.example_indices(step, micro, d)]
            assert joined == list(one.example_indices(step, micro, 0))
            # a host feeding all its devices at once draws the same indices as its devices one by one
            assert list(many.example_indices(step, micro, 0, devices)) == joined
    seen = [i for s in range(5) for m in range(accumulation) for i in one.example_indices(s, m, 0)]
    assert seen == list(range(5 * accumulation * batch * devices))  # every example once, none skipped


def test_step_actions():
    plan = run.RunPlan(1, 1, 1, 10, max_train_steps=12, learning_rate=1.0, save_steps=4, checkpointing_steps=6,
                       validation_steps=5, logging_steps=3)
    act = {s: plan.actions(s) for s in range(1, 13)}
    assert [s for s in act if act[s].save_embeddings] == [4, 8, 12]
    assert [s for s in act if act[s].save_checkpoint] == [6, 12]
    assert [s for s in act if act[s].validate] == [5, 10]
    # losses reach the host on logging steps, before every save or validation, and at the end
    assert [s for s in act if act[s].fetch_losses] == [3, 4, 5, 6, 8, 9, 10, 12]
    assert not any(a.stop for a in act.values())
    stopped = plan.actions(7, interrupted=True)
    assert stopped.stop and stopped.save_embeddings and stopped.save_checkpoint and stopped.fetch_losses
    last = plan.actions(12, interrupted=True)  # the last step ends normally, with its final files
    assert not last.stop
    off = run.RunPlan(1, 1, 1, 10, 3, 1.0)  # 0 disables each periodic action
    assert not any(off.actions(s).save_embeddings or off.actions(s).save_checkpoint or off.actions(s).validate
                   for s in range(1, 4))


def test_seed_comes_from_the_checkpoint_then_the_flag_then_one_draw(caplog):
    logger = logging.getLogger("test")
    assert run.resolve_seed(5, None, logger) == 5
    with caplog.at_level(logging.WARNING):
        assert run.resolve_seed(5, {"seed": 9}, logger) == 9
    assert "differs from the checkpoint's 9" in caplog.text
    drawn = run.resolve_seed(None, None, logger, share=lambda seed: 77)  # every process takes process 0's
    assert drawn == 77
    assert 0 <= run.resolve_seed(None, None, logger) < 2**31


def _inputs(state=None, vectors=None, adam=False):
    tensors = None
    if state is not None:
        tensors = {"vectors": vectors}
        if adam:
            tensors.update(exp_avg=np.ones_like(vectors), exp_avg_sq=np.full_like(vectors, 2.0))
    return RunInputs(None, "out/checkpoint-3" if state else None, tensors, state, None)


def test_resume_point_checks_the_checkpoint_against_the_run(caplog):
    args = flags(num_vectors=2, train_batch_size=2)
    plan = run.make_plan(args, 8, 1)
    logger = logging.getLogger("test")
    vectors = np.arange(8, dtype=np.float32).reshape(2, 4)
    state = {"seed": 1, "num_vectors": 2, "global_batch": 2, "step": 3, "optimizer_step": 3.0}
    point = run.resume_point(args, _inputs(state, vectors, adam=True), [4], plan, logger)
    assert point.step == 3 and len(point.vector_sets) == 1 and np.array_equal(point.vector_sets[0], vectors)
    assert point.adam_sets[0].step == 3 and np.array_equal(point.adam_sets[0].exp_avg_sq, np.full_like(vectors, 2.0))
    with pytest.raises(UserError, match="other --num_vectors or another model"):
        run.resume_point(args, _inputs(state, vectors), [8], plan, logger)  # another text-encoder width
    with pytest.raises(UserError, match="other --num_vectors"):
        run.resume_point(args, _inputs(dict(state, num_vectors=1), vectors[:1]), [4], plan, logger)
    with pytest.raises(UserError, match=r"made for SD-1.x/2.x \(1 text encoder\), this model is SDXL \(2 text encoders\)"):
        run.resume_point(args, _inputs(state, vectors), [4, 6], plan, logger)
    with caplog.at_level(logging.WARNING):
        run.resume_point(args, _inputs(dict(state, global_batch=8), vectors), [4], plan, logger)
    assert "another global batch" in caplog.text


def test_latest_without_a_checkpoint_warns_in_both_trainers(caplog):
    """Shared since the loops were unified: the Flax trainer used to start a new run silently."""
    args = flags(resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING):
        point = run.resume_point(args, _inputs(), [4], run.make_plan(args, 8, 1), logging.getLogger("test"))
    assert point == run.Resume()
    assert "no checkpoint in text-inversion-model yet, starting a new run" in caplog.text


@pytest.mark.parametrize("widths", [[4], [4, 6]])
def test_checkpoint_payload_round_trips_through_resume_point(widths):
    args = flags(num_vectors=2, seed=3)
    plan = run.make_plan(args, 8, 2)
    rng = np.random.default_rng(0)
    vector_sets = [rng.standard_normal((2, w)).astype(np.float32) for w in widths]
    adam_sets = [run.AdamMoments(v * 0.1, v**2, 5) for v in vector_sets]
    tensors, state = run.checkpoint_payload(vector_sets, adam_sets, 3, args, plan, "flax")
    expected = ["exp_avg", "exp_avg_sq", "vectors"]
    if len(widths) == 2:  # SDXL: text_encoder_2's set under the _2 names
        expected += ["exp_avg_2", "exp_avg_sq_2", "vectors_2"]
    assert sorted(tensors) == sorted(expected)
    assert state["global_batch"] == plan.global_batch and state["optimizer_step"] == 5.0
    assert state["text_encoders"] == len(widths)
    inputs = RunInputs(None, "out/checkpoint-5", tensors, dict(state, step=5), None)
    point = run.resume_point(args, inputs, widths, plan, logging.getLogger("test"))
    assert point.step == 5
    for got, want, got_adam, want_adam in zip(point.vector_sets, vector_sets, point.adam_sets, adam_sets):
        assert np.array_equal(got, want) and got_adam.step == 5
        assert np.array_equal(got_adam.exp_avg, want_adam.exp_avg)
        assert np.array_equal(got_adam.exp_avg_sq, want_adam.exp_avg_sq)
    fresh, fresh_state = run.checkpoint_payload(vector_sets, None, 3, args, plan, "pytorch")
    assert sorted(fresh) == sorted(k for k in expected if k.startswith("vectors")) and fresh_state["optimizer_step"] == 0.0


def test_stop_signals_are_caught_then_the_previous_handlers_come_back():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with run.StopSignals() as stop:
            assert not stop.requested
            signal.raise_signal(signal.SIGINT)  # caught: no KeyboardInterrupt
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is mine
        with pytest.raises(RuntimeError):
            with run.StopSignals():
                raise RuntimeError("a failed run also gives the handlers back")
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


def test_loss_log_fetches_pending_losses_together_and_stops_on_the_first_non_finite():
    log = run.LossLog()
    fetched_batches = []

    def to_host(values):
        fetched_batches.append(len(values))
        return values

    log.add(1, 0.5, 1e-3)
    log.add(2, 0.25, 1e-3)
    assert log.fetch(to_host) == [(1, 0.5, 1e-3, {}), (2, 0.25, 1e-3, {})]
    assert fetched_batches == [2] and log.fetch(to_host) == [] and fetched_batches == [2]
    log.add(3, float("nan"), 1e-3)
    log.add(4, float("inf"), 1e-3)
    with pytest.raises(UserError, match="loss became nan at step 3; lower --learning_rate"):
        log.fetch(to_host)
    assert log.history == [(1, 0.5), (2, 0.25)]
    with pytest.raises(UserError, match="learned vectors became non-finite by step 4"):
        run.check_finite_vectors([np.zeros((1, 2)), np.array([[1.0, np.inf]])], 4)  # any set
    run.check_finite_vectors([np.zeros((2, 3))], 4)


def test_latent_cache_encodes_each_image_and_flip_once_then_frees_the_encoder():
    class Images:
        num_images = 2

        def pixels(self, image, flip):
            return np.full((3, 2, 2), image * 10 + flip, np.float32)

    calls, freed = [], []

    def encode(pixels):
        calls.append(len(pixels))
        # a strided (channels-last-like) view, as a framework may return: the cache stores it C-contiguous
        means = [np.asfortranarray(p[:2] + 0.5) for p in pixels]
        return means, [p[:2] * 0 + 1 for p in pixels]

    cache = run.LatentCache(Images(), encode, on_full=lambda: freed.append(True))
    mean, std = cache([(0, False), (1, True), (0, False)])
    # One picture per call (the VAE's kernels differ with batch size): each missing key once, the repeat not again.
    assert calls == [1, 1] and mean.shape == (3, 2, 2, 2) and mean[2, 0, 0, 0] == 0.5 and mean[1, 0, 0, 0] == 11.5
    assert all(entry[0].flags.c_contiguous for entry in cache.entries.values())
    cache([(0, True), (1, False)])
    assert calls == [1, 1, 1, 1] and freed == [True]
    cache([(1, False)])
    assert calls == [1, 1, 1, 1] and freed == [True]


def test_zero_learning_rate_is_zero_in_every_schedule():
    for name in ("constant", "linear", "cosine", "polynomial", "constant_with_warmup", "cosine_with_restarts"):
        assert lr_table(name, 2, 10, 1, 0.0) == [0.0] * 11
    assert flags(learning_rate=0).learning_rate == 0.0
    with pytest.raises(UserError, match="--lr_scheduler polynomial decays to 1e-7"):
        flags(learning_rate=1e-8, lr_scheduler="polynomial")


def test_report_to_all_means_the_installed_trackers(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # a None entry makes a package look absent
    monkeypatch.setitem(sys.modules, "comet_ml", None)
    assert select_trackers("all") == ["tensorboard"]
    assert select_trackers("none") == []
    with pytest.raises(UserError, match="--report_to wandb needs the wandb package"):
        select_trackers("wandb")
    with pytest.raises(UserError, match="--report_to comet_ml is not supported by the Flax trainer"):
        select_trackers("comet_ml", supported=("tensorboard", "wandb"), trainer="the Flax trainer")


@pytest.fixture
def never_logged_in(monkeypatch, tmp_path):
    """A machine that never ran `wandb login`: an empty HOME, no W&B variables, a fresh working folder."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR",
                 "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home, work


def test_wandb_without_a_login_is_one_line_before_any_model(never_logged_in):
    for report_to in ("wandb", "all"):
        with pytest.raises(UserError, match=r"has no login on this machine .*run `wandb login`, set "
                                            r"WANDB_MODE=offline, or choose another tracker") as info:
            select_trackers(report_to)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="--report_to all includes wandb"):
        select_trackers("all")
    with pytest.raises(UserError, match=r"\(--report_to tensorboard or none\)"):
        select_trackers("wandb", supported=("tensorboard", "wandb"), trainer="the Flax trainer")


@pytest.mark.parametrize("setup", ["WANDB_MODE=offline", "WANDB_MODE=disabled", "WANDB_API_KEY", "netrc",
                                   "wandb offline", "global settings api_key", "WANDB_BASE_URL + its netrc entry"])
def test_wandb_that_can_log_or_is_offline_passes(never_logged_in, monkeypatch, setup):
    home, work = never_logged_in
    if setup.startswith("WANDB_MODE="):
        monkeypatch.setenv("WANDB_MODE", setup.split("=")[1])
    elif setup == "WANDB_API_KEY":
        monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    elif setup == "netrc":  # what `wandb login` writes
        (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    elif setup == "wandb offline":  # the command writes mode into the workspace settings
        (work / "wandb").mkdir()
        (work / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    elif setup == "global settings api_key":
        (home / ".config" / "wandb").mkdir(parents=True)
        (home / ".config" / "wandb" / "settings").write_text("[default]\napi_key = " + "0" * 40 + "\n")
    else:
        monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
        (home / ".netrc").write_text("machine wandb.example.com login user password " + "0" * 40 + "\n")
    assert select_trackers("wandb") == ["wandb"]
    assert "wandb" in select_trackers("all")


def test_a_netrc_entry_for_another_server_is_no_wandb_login(never_logged_in, monkeypatch):
    home, _ = never_logged_in
    (home / ".netrc").write_text("machine github.com login user password x\n")
    with pytest.raises(UserError, match="no netrc entry for api.wandb.ai"):
        select_trackers("wandb")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    with pytest.raises(UserError, match="no netrc entry for wandb.example.com"):
        select_trackers("wandb")


def test_add_placeholder_tokens_with_the_real_clip_vocabulary(tiny_pipeline):
    from transformers import CLIPTokenizer

    from textual_inversion_core.tokens import add_placeholder_tokens, placeholder_string

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    size = len(tokenizer)
    ids, initializer = add_placeholder_tokens(tokenizer, "<cat-toy>", 3, "toy")
    assert ids == [size, size + 1, size + 2] and initializer == tokenizer.encode("toy", add_special_tokens=False)
    assert placeholder_string(tokenizer, ids) == "<cat-toy> <cat-toy>_1 <cat-toy>_2"
    with pytest.raises(UserError, match="already in the tokenizer's vocabulary"):
        add_placeholder_tokens(tokenizer, "<cat-toy>", 1, "toy")
    fresh = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    with pytest.raises(UserError, match="already in the tokenizer's vocabulary"):
        add_placeholder_tokens(fresh, "cat", 1, "toy")
    with pytest.raises(UserError, match="its word 'toyotacorollahatchback' is 6 tokens .* must be a single token"):
        add_placeholder_tokens(fresh, "<new>", 1, "toy toyotacorollahatchback")
    assert len(fresh) == size  # nothing added by a refused call


def test_adamw8bit_state_round_trips_through_a_checkpoint_with_its_dtypes(tmp_path):
    """bitsandbytes' own tensors go out and come back as they were: uint8 codes stay uint8, names per set."""
    from textual_inversion_core import checkpoints

    args = flags(num_vectors=2, seed=3)
    plan = run.make_plan(args, 8, 1)
    rng = np.random.default_rng(0)
    vector_sets = [rng.standard_normal((2, w)).astype(np.float32) for w in (4, 6)]
    adam_sets = [run.Adam8bitState({"state1": v * 0.1, "state2": v**2}, 5) for v in vector_sets[:1]]
    adam_sets.append(run.Adam8bitState({"state1": rng.integers(0, 256, (2, 6), dtype=np.uint8),
                                        "state2": rng.integers(0, 256, (2, 6), dtype=np.uint8),
                                        "qmap1": np.linspace(-1, 1, 256, dtype=np.float32),
                                        "qmap2": np.linspace(0, 1, 256, dtype=np.float32),
                                        "absmax1": np.array([0.5], np.float32), "absmax2": np.array([0.25], np.float32)},
                                       5))
    tensors, state = run.checkpoint_payload(vector_sets, adam_sets, 3, args, plan, "pytorch", run.ADAMW_8BIT)
    assert state["optimizer"] == "adamw8bit" and "exp_avg" not in tensors
    path = checkpoints.save_checkpoint(str(tmp_path), 5, tensors, state)
    tensors, state = checkpoints.load_checkpoint(path)
    point = run.resume_point(args, RunInputs(None, path, tensors, state, None), [4, 6], plan, logging.getLogger("test"))
    for got, want in zip(point.adam_sets, adam_sets):
        assert isinstance(got, run.Adam8bitState) and got.step == 5 and sorted(got.tensors) == sorted(want.tensors)
        for name, value in want.tensors.items():
            assert got.tensors[name].dtype == value.dtype and np.array_equal(got.tensors[name], value), name
    del tensors["bnb_state2_2"]
    with pytest.raises(UserError, match="lacks part of its AdamW8bit state"):
        run.resume_point(args, RunInputs(None, path, tensors, state, None), [4, 6], plan, logging.getLogger("test"))


@pytest.mark.parametrize("stored, running, fix", [
    ({"framework": "pytorch"}, run.ADAMW_8BIT, "resume without --use_8bit_adam"),  # written before 8-bit support
    ({"framework": "flax", "optimizer": "adamw"}, run.ADAMW_8BIT, "resume without --use_8bit_adam"),
    ({"framework": "pytorch", "optimizer": "adamw8bit"}, run.ADAMW, "resume with textual_inversion.py --use_8bit_adam"),
])
def test_a_checkpoint_resumes_only_with_its_own_optimizer(stored, running, fix):
    run.check_optimizer("out/checkpoint-2", stored, stored.get("optimizer", "adamw"))  # its own: accepted
    with pytest.raises(UserError, match=f"{stored['framework']} trainer.*; {fix} or start a new --output_dir") as info:
        run.check_optimizer("out/checkpoint-2", stored, running)
    assert "\n" not in str(info.value)
