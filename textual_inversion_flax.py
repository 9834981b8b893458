#!/usr/bin/env python
"""Textual Inversion for Stable Diffusion with JAX/Flax (one host with many devices, or a TPU pod).

    python textual_inversion_flax.py --pretrained_model_name_or_path=MODEL \
        --train_data_dir=DIR --placeholder_token="<cat-toy>" --initializer_token="toy" ...

The twin of textual_inversion.py: the same flags (one shared argparse definition), the same data
order, the same output files and the same checkpoint format (a checkpoint written by one trainer
resumes in the other). main() reads top to bottom: parse -> load -> prepare -> loop -> save, with the
step arithmetic and the loop's bookkeeping from textual_inversion_core.run (shared with the PyTorch
script) and the Flax parts from flax_backend/: weights (loading and conversion), model (the objective,
TrainState and the pure train_step) and pipeline (trackers, validation, saving).

The train step is pure and pmapped over every device (each host feeds its jax.local_devices());
gradients are pmean-ed across all of them. Every random draw of an example comes from (seed, global
example index), so a run on 2 devices equals a run on 1 device with the same global batch, and a
resumed run the uninterrupted one. The loss stays on the device until it is logged or checked.
"""

import logging
import sys
import warnings

import numpy as np

from textual_inversion_core import checkpoints, controls, embeddings, eval_record, hub, outputs, run
from textual_inversion_core.cli import parse_args
from textual_inversion_core.errors import UserError, run_cli
from textual_inversion_core.preflight import fit_init_vectors, load_run_inputs
from textual_inversion_core.schedules import lr_table
from textual_inversion_core.tokens import add_placeholder_tokens, initializer_vectors, placeholder_string
from textual_inversion_core.trackers import select_trackers

logger = logging.getLogger("textual_inversion_flax")


def check_flags(args):
    """The shared parser carries some PyTorch-only flags; each is honoured here or refused in one line."""
    if args.mixed_precision == "fp16":
        raise UserError("--mixed_precision fp16 is not supported by the Flax trainer (no loss scaling in JAX); "
                        "use --mixed_precision bf16, which needs none")
    if args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing is not available in the Flax trainer (diffusers' Flax UNet has no "
                        "rematerialisation); drop the flag and lower --train_batch_size, or use textual_inversion.py")
    if args.use_8bit_adam:
        raise UserError("--use_8bit_adam is not available in the Flax trainer (bitsandbytes' 8-bit AdamW is CUDA/PyTorch "
                        "only; optax has none); drop the flag (the vectors' AdamW state is small) or use textual_inversion.py")
    if args.local_rank != -1:
        raise UserError(f"--local_rank {args.local_rank} (or LOCAL_RANK) is set by torch launchers; run the Flax trainer "
                        "with plain `python` (JAX finds its devices; for several hosts set JAX_COORDINATOR_ADDRESS)")
    if args.eval_clip_model:
        # Sampling with the PyTorch pipeline on this host's CPU would stall a TPU/GPU run for minutes per saved step.
        raise UserError("--eval_clip_model is for textual_inversion.py; the Flax trainer measures the validation loss "
                        "in training: score its saved steps afterwards with `python -m textual_inversion_core.evaluate "
                        "OUTPUT_DIR --eval_clip_model MODEL [--select_best RULE]` in the PyTorch environment")
    return select_trackers(args.report_to, supported=("tensorboard", "wandb"), trainer="the Flax trainer")


def main(argv=None):
    args = parse_args(argv, prog="textual_inversion_flax.py")

    # ---- Checks that need no model: fail in seconds, not after loading gigabytes.
    trackers = check_flags(args)
    from flax_backend import hosts
    from flax_backend.weights import check_family_has_flax, resolve_model_folder

    hosts.start_jax(args)  # before reading the inputs: with several hosts, a problem on one stops them all
    processes = hosts.processes()
    # SD3 / Flux.1 (no Flax models): one line pointing at textual_inversion.py
    processes.agree(lambda: check_family_has_flax(args.pretrained_model_name_or_path, args.revision))
    inputs = load_run_inputs(args, processes=processes)
    dataset = inputs.dataset
    folder = processes.agree(lambda: resolve_model_folder(args))

    import jax
    import jax.numpy as jnp
    import optax
    from jax.experimental import multihost_utils
    from tqdm.auto import tqdm

    from flax_backend import model as fm
    from flax_backend.pipeline import Trackers, Validator, full_precision_params, save_full_pipeline
    from flax_backend.weights import load_models

    process, num_processes, is_main = processes.index, processes.count, processes.is_main
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("diffusers", "transformers", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not is_main:
        logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
    hub_repo_id = processes.agree(lambda: hub.preflight(args) if args.push_to_hub and is_main else None)

    args.seed = seed = dataset.seed = run.resolve_seed(args.seed, inputs.resume_state, logger, processes.share_int)

    # ---- Load
    weight_dtype = jnp.bfloat16 if args.mixed_precision == "bf16" else jnp.float32
    # A model missing or damaged on one host stops every host (each loads its own copy).
    family, tokenizers, noise_scheduler, scheduler_state, scheduler_config, loaded = processes.agree(
        lambda: load_models(args, folder, weight_dtype))
    models = {name: model for name, (model, _, _) in loaded.items()}
    params = {name: weights for name, (_, weights, _) in loaded.items()}
    del loaded  # one host copy of the weights at a time: SD-sized models are gigabytes
    encoder_names = ("text_encoder", "text_encoder_2")[: len(tokenizers)]
    # The placeholder tokens go into every tokenizer (SDXL: both), with the same strings in every prompt.
    added = [add_placeholder_tokens(tok, args.placeholder_token, args.num_vectors, args.initializer_token)
             for tok in tokenizers]
    prompt_ids = []
    for tokenizer, (placeholder_ids, _) in zip(tokenizers, added):
        dataset.tokenize(tokenizer, placeholder_string(tokenizer, placeholder_ids))
        prompt_ids.append(dataset.all_prompt_ids.astype(np.int32))
    prompt_ids = np.stack(prompt_ids, axis=1)  # [num_prompts, text encoders, 77]

    # ---- Prepare: each embedding matrix grows by the new rows (initialised like the PyTorch script).
    tables = [np.asarray(fm.token_embedding_table(params[name]), np.float32) for name in encoder_names]
    starts = fit_init_vectors(args, inputs.init_vectors, [t.shape[1] for t in tables])
    for i, (name, tokenizer, table, (placeholder_ids, initializer_ids)) in enumerate(
            zip(encoder_names, tokenizers, tables, added)):
        if starts[i] is None:  # the initializer word's embedding, or a phrase's (tokens.initializer_rows)
            starts[i] = initializer_vectors(table, initializer_ids, args.num_vectors)
        fm.add_placeholder_rows(models[name], params[name], len(tokenizer), placeholder_ids, starts[i])
    frozen_host = {name: jax.tree.map(lambda x: np.asarray(x).astype(weight_dtype, copy=False), params[name])
                   for name in encoder_names + ("unet",)}
    frozen_host["scheduler"] = scheduler_state
    vae_params = jax.tree.map(jnp.asarray, params["vae"])
    del params, tables

    devices = jax.local_devices()
    plan = run.make_plan(args, len(dataset), jax.device_count())
    lrs = lr_table(args.lr_scheduler, args.lr_warmup_steps, plan.max_train_steps, args.lr_num_cycles,
                   plan.learning_rate)
    lrs_on_device = jnp.asarray(lrs, dtype=jnp.float32)
    optimizer = optax.adamw(lambda count: lrs_on_device[jnp.minimum(count, plan.max_train_steps)], b1=args.adam_beta1,
                            b2=args.adam_beta2, eps=args.adam_epsilon, weight_decay=args.adam_weight_decay)
    resume = run.resume_point(args, inputs, [s.shape[1] for s in starts], plan, logger)
    state = fm.new_train_state(optimizer, starts if resume.vector_sets is None else resume.vector_sets, resume.step,
                               resume.adam_sets)
    step = resume.step

    vae = models["vae"]
    latents = run.LatentCache(dataset, fm.encode_posteriors(vae, vae_params))
    # --snr_gamma, --noise_offset, the timestep range and the norm control (all off without their flags); the
    # start norms come from the start vectors, which a resume re-derives.
    control = controls.from_args(args, int(noise_scheduler.config.num_train_timesteps))
    norm_keys = controls.norm_log_keys(len(encoder_names))
    loss_fn = fm.make_denoising_loss([models[name] for name in encoder_names], models["unet"], noise_scheduler,
                                     [ids for ids, _ in added], weight_dtype, control.snr_gamma)
    # The latent shape comes with each batch: with buckets pmap compiles the step once per bucket shape.
    train_step = jax.pmap(fm.make_train_step(loss_fn, optimizer, float(vae.config.scaling_factor),
                                             int(noise_scheduler.config.num_train_timesteps), control,
                                             controls.norm_targets(control, starts)),
                          axis_name="batch", donate_argnums=(0,))  # all hosts' devices: pmean spans them
    # Inputs laid out exactly as pmap lays out its outputs (same mesh axis name), so that step 2
    # reuses step 1's executable instead of compiling the step a second time.
    device_split = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("batch",)),
                                              jax.sharding.PartitionSpec("batch"))
    p_state, p_frozen = fm.replicate((state, frozen_host), devices, device_split)
    del frozen_host, state
    # The loss on held-out images (--validation_split / --validation_data_dir), measured by the main host only.
    evaluation = eval_record.start(args, inputs, tokenizers, [ids for ids, _ in added],
                                   fm.encode_posteriors(vae, vae_params), control.timestep_range) if is_main else None
    held_out_loss = fm.make_held_out_loss([models[name] for name in encoder_names], models["unet"], noise_scheduler,
                                          [ids for ids, _ in added], weight_dtype, float(vae.config.scaling_factor))

    def batch_for(step):
        """This host's share of a step, [local devices, accumulation, batch, ...], on the devices."""
        batch = run.host_batch(plan, dataset, latents, seed, step, process * len(devices), len(devices))
        batch = {"mean": batch["mean"], "std": batch["std"], "ids": prompt_ids[batch["prompt"]],
                 "keys": np.stack([np.stack([fm.raw_prng_key(s) for s in row]) for row in batch["noise_seed"]]),
                 **({"time_ids": batch["time_ids"].astype(np.float32)} if family == "sdxl" else {}),
                 **({"mask": batch["mask"]} if "mask" in batch else {})}  # the masked loss's weights
        shape = (plan.accumulation, len(devices), plan.per_device_batch)
        return {k: jax.device_put(np.swapaxes(v.reshape(shape + v.shape[2:]), 0, 1), device_split)
                for k, v in batch.items()}

    def interrupted_anywhere(stop):
        if num_processes == 1:
            return stop.requested
        return bool(np.any(multihost_utils.process_allgather(np.int32(stop.requested))))

    def host_state():
        return jax.tree.map(lambda x: np.asarray(x[0]), p_state)

    def host_sets():
        return [np.asarray(v[0], np.float32) for v in p_state.vectors]

    def device_0_state():  # the vectors and frozen params of device 0
        return tuple(v[0] for v in p_state.vectors), jax.tree.map(lambda x: x[0], p_frozen)

    def current_params():
        """Params for sampling and saving (device-0 copies), with the learned rows merged in."""
        frozen = jax.tree.map(lambda x: x[0], p_frozen)
        current = {"unet": frozen["unet"], "vae": vae_params}
        for name, (placeholder_ids, _), vectors in zip(encoder_names, added, p_state.vectors):
            current[name] = fm.merged_text_encoder_params(frozen[name], placeholder_ids, vectors[0])
        return current

    tracker = Trackers(args, trackers, is_main)
    validator = None
    logger.info("  frozen weights %s, learned vectors float32, VAE float32", jnp.dtype(weight_dtype).name)
    run.log_start(logger, plan, dataset, seed,
                  f"hosts = {num_processes}, devices = {plan.num_devices} (local {len(devices)}), "
                  f"model = {run.describe_encoders(len(encoder_names))}")
    # Hosts load models at their own pace; the first step's collectives give a late one only 30 s (gloo, CPU).
    hosts.wait_for_every_process("models loaded")
    progress = tqdm(range(plan.max_train_steps), initial=step, desc="Steps", disable=not is_main)
    losses = run.LossLog()

    # ---- Loop
    with run.StopSignals() as stop:
        while step < plan.max_train_steps:
            p_state, p_loss, p_norms = train_step(p_state, p_frozen, batch_for(step))
            losses.add(step + 1, p_loss, lrs[step], dict(zip(norm_keys, p_norms)))
            step += 1
            progress.update(1)
            actions = plan.actions(step, interrupted_anywhere(stop))
            if actions.fetch_losses:
                for logged_step, value, lr, extras in losses.fetch(lambda values: [np.asarray(v)[0] for v in values]):
                    tracker.log({"loss": value, "lr": lr, **extras}, logged_step)
                progress.set_postfix({"loss": f"{losses.history[-1][1]:.4f}", **run.norm_postfix(losses.last_extras),
                                      "lr": f"{lrs[step - 1]:.2e}"})  # in this order: loss, norm(s), lr
                run.check_finite_vectors(host_sets(), step)
            if is_main:
                if actions.save_embeddings:
                    embeddings.write_diffusers(args.output_dir, args.placeholder_token, run.output_vectors(host_sets()),
                                               safe_serialization=not args.no_safe_serialization,
                                               suffix=f"-steps-{step}")
                if actions.save_checkpoint:
                    host = host_state()
                    tensors, payload = run.checkpoint_payload(list(host.vectors), fm.adam_moments(host), seed, args,
                                                              plan, "flax")
                    logger.info("saved %s", checkpoints.save_checkpoint(args.output_dir, step, tensors, payload,
                                                                        args.checkpoints_total_limit))
                if actions.validate:
                    validator = validator or Validator(args, models, tokenizers, scheduler_config)
                    validator(current_params(), step, tracker)
                if actions.evaluate:  # the held-out loss (eval.json)
                    tracker.log(evaluation.after_step(step, actions, held_out_loss(*device_0_state())), step)
            if actions.stop:
                progress.close()
                logger.warning("stopped by signal at step %d; resume with --resume_from_checkpoint latest", step)
                tracker.close()
                hosts.wait_for_every_process("stopped")  # process 0 has written its checkpoint
                return 130
    progress.close()

    # ---- Save
    if is_main:
        learned = host_sets()

        def save_pipeline():
            pipeline_params = full_precision_params(folder, args.variant, current_params(), weight_dtype,
                                                    [len(t) for t in tokenizers], [ids for ids, _ in added], learned)
            save_full_pipeline(args, args.output_dir, models, pipeline_params, tokenizers, scheduler_config)

        outputs.finish_run(args, run.output_vectors(learned), step, losses.history, hub_repo_id, save_pipeline, logger,
                           evaluation=evaluation)
    tracker.close()
    hosts.wait_for_every_process("final files written")  # the others wait here, not in jax's shutdown barrier
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
