#!/usr/bin/env python
"""Textual Inversion for Stable Diffusion with PyTorch and Accelerate.

    accelerate launch textual_inversion.py --pretrained_model_name_or_path=MODEL \
        --train_data_dir=DIR --placeholder_token="<cat-toy>" --initializer_token="toy" ...

Reads top to bottom: parse -> load -> prepare -> loop -> save. Only the placeholder vectors are
trainable; everything else is frozen. VAE posteriors are cached per (image, flip), so the VAE
encoder runs once per image instead of once per step. All randomness of an example (image order,
flip, template, posterior sample, noise, timestep) is keyed by its global index, which makes
resuming exact and a run on N processes equal to one process with the same global batch.
An SDXL pipeline (a second text encoder, text_encoder_2) is recognised from its folder: both
tokenizers get the placeholder tokens and each text encoder its own trainable vectors.
The step arithmetic, checkpoints and the loop's bookkeeping are textual_inversion_core.run, shared
with textual_inversion_flax.py; the PyTorch parts are in torch_backend/.
"""

import importlib.util
import logging
import os
import sys
import warnings

from textual_inversion_core import checkpoints, controls, embeddings, eval_record, families, hub, outputs, run
from textual_inversion_core.cli import parse_args, public_config
from textual_inversion_core.errors import UserError, run_cli
from textual_inversion_core.preflight import fit_init_vectors, load_run_inputs
from textual_inversion_core.schedules import lr_table
from textual_inversion_core.tokens import add_placeholder_tokens, initializer_vectors, placeholder_string
from textual_inversion_core.trackers import select_trackers

logger = logging.getLogger("textual_inversion")


def check_xformers(args):
    """xFormers is CUDA-only: say so in one line instead of failing deep inside diffusers."""
    if not args.enable_xformers_memory_efficient_attention:
        return
    if importlib.util.find_spec("xformers") is None:
        raise UserError("--enable_xformers_memory_efficient_attention needs the xformers package; "
                        "pip install xformers (CUDA only) or drop the flag: PyTorch SDPA attention is used by default")
    import torch

    if not torch.cuda.is_available():
        raise UserError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; "
                        "drop the flag on this machine (PyTorch SDPA attention is used by default)")


def check_family_trains(args):
    """SD3/SD3.5 and Flux.1 embedding files are written, converted and loaded (families.py, pipeline_loading), but
    this trainer has no flow-matching loss yet: say so in one line instead of failing inside the UNet loader."""
    spec = families.family_of(args.pretrained_model_name_or_path, args.revision)
    if spec is not None and spec.flow_matching:
        raise UserError(f"--pretrained_model_name_or_path {str(args.pretrained_model_name_or_path)!r} is a {spec.label} "
                        f"pipeline ({spec.pipeline_class}); this release trains SD-1.x/2.x and SDXL only: choose one of "
                        "those (SD3/Flux.1 files can be converted and loaded with load_embedding_into_pipeline)")


def main(argv=None, prog="textual_inversion.py"):
    args = parse_args(argv, prog=prog)

    # ---- Checks that need no model: fail in seconds, not after loading gigabytes.
    check_xformers(args)
    check_family_trains(args)
    optimizer_name = run.ADAMW_8BIT if args.use_8bit_adam else run.ADAMW
    if args.use_8bit_adam:  # bitsandbytes and CUDA
        from torch_backend.optimizer import check_8bit_adam

        check_8bit_adam()
    trackers = select_trackers(args.report_to)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from torch_backend import hosts, scores
    from torch_backend import model as tm
    from torch_backend import optimizer as topt
    from torch_backend.pipeline import run_validation, save_full_pipeline

    # Before reading the inputs: with several processes, only the first touches the output folder, and a problem
    # on any stops them all (textual_inversion_core.processes).
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    processes = hosts.processes(accelerator)
    inputs = load_run_inputs(args, optimizer_name, processes=processes)  # a checkpoint of the other optimizer is refused here
    dataset = inputs.dataset
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
    hub_repo_id = processes.agree(lambda: hub.preflight(args) if args.push_to_hub and processes.is_main else None)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    args.seed = seed = dataset.seed = run.resolve_seed(args.seed, inputs.resume_state, logger, processes.share_int)
    torch.manual_seed(seed)

    # ---- Load
    models = processes.agree(lambda: tm.load_models(args))  # a model missing on one machine stops every machine
    run.check_prediction_type(models.noise_scheduler.config.prediction_type)
    if args.enable_xformers_memory_efficient_attention:
        tm.enable_xformers_attention(models)
    # The placeholder tokens go into every tokenizer (SDXL: both), with the same strings in every prompt.
    added = [add_placeholder_tokens(tok, args.placeholder_token, args.num_vectors, args.initializer_token)
             for tok in models.tokenizers]
    prompt_ids = []
    for tokenizer, (placeholder_ids, _) in zip(models.tokenizers, added):
        dataset.tokenize(tokenizer, placeholder_string(tokenizer, placeholder_ids))
        prompt_ids.append(torch.from_numpy(dataset.all_prompt_ids))

    # ---- Prepare: freeze everything, then make the placeholder vectors of each text encoder the trainable tensors.
    vae, unet, text_encoders = models.vae, models.unet, models.text_encoders
    for module in (vae, unet):
        module.requires_grad_(False)
    tables = [te.get_input_embeddings().weight.data for te in text_encoders]
    starts = fit_init_vectors(args, inputs.init_vectors, [t.shape[1] for t in tables])
    for i, (table, (_, initializer_ids)) in enumerate(zip(tables, added)):
        if starts[i] is None:  # the initializer word's embedding, or a phrase's (tokens.initializer_rows)
            starts[i] = initializer_vectors(table.float().numpy(), initializer_ids, args.num_vectors)
    del tables

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    vae.to(device, dtype=torch.float32)  # fp32: its posterior is computed once per image and cached exactly
    unet.to(device, dtype=weight_dtype)
    for text_encoder in text_encoders:
        text_encoder.to(device, dtype=weight_dtype)
        text_encoder.eval()
    # Inserted after the cast, so the trainable vectors are the fp32 start vectors themselves (never rounded
    # through fp16/bf16); the rest of each text encoder runs in weight_dtype.
    vector_sets = [tm.insert_placeholder_embedding(text_encoder, len(tokenizer), placeholder_ids, start).vectors
                   for text_encoder, tokenizer, (placeholder_ids, _), start in
                   zip(text_encoders, models.tokenizers, added, starts)]
    unet.eval()
    if args.gradient_checkpointing:
        # Both only checkpoint in train mode; neither has dropout in SD configs, so outputs are the same.
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
            text_encoder.train()
        unet.enable_gradient_checkpointing()
        unet.train()

    plan = run.make_plan(args, len(dataset), accelerator.num_processes)
    lrs = lr_table(args.lr_scheduler, args.lr_warmup_steps, plan.max_train_steps, args.lr_num_cycles,
                   plan.learning_rate)
    optimizer = topt.make_optimizer(args, vector_sets, plan.learning_rate)
    optimizer = accelerator.prepare(optimizer)
    resume = run.resume_point(args, inputs, [v.shape[1] for v in vector_sets], plan, logger)
    if resume.vector_sets is not None:
        with torch.no_grad():
            for vectors, stored in zip(vector_sets, resume.vector_sets):
                vectors.copy_(torch.from_numpy(stored))
    if resume.adam_sets is not None:
        topt.load_optimizer_state(optimizer, resume.adam_sets, device)
    step = resume.step

    if accelerator.is_main_process and trackers:
        config = {k: (",".join(v) if isinstance(v, list) else v) for k, v in public_config(args).items()}
        accelerator.init_trackers("textual_inversion", config=config)

    latents = run.LatentCache(dataset, tm.encode_posteriors(vae, device), on_full=lambda: tm.free_vae_encoder(vae))
    # --snr_gamma, --noise_offset, the timestep range and the norm control (all off without their flags).
    control = controls.from_args(args, models.noise_scheduler.config.num_train_timesteps)
    norm_targets = controls.norm_targets(control, starts)  # from the start vectors: a resume re-derives them
    if norm_targets is not None:
        norm_targets = [torch.from_numpy(t).to(device) for t in norm_targets]
    norm_keys = controls.norm_log_keys(len(vector_sets))
    # The loss on held-out images (--validation_split / --validation_data_dir), measured by the main process only.
    evaluation = None
    # With --eval_clip_model, also the paper's CLIP scores of every saved step (torch_backend.scores).
    if accelerator.is_main_process:
        paper = scores.paper_scorer(args, models, device, accelerator.autocast) if args.eval_clip_model else None
        evaluation = eval_record.start(args, inputs, models.tokenizers, [ids for ids, _ in added],
                                       tm.encode_posteriors(vae, device), control.timestep_range, paper)
    held_out_loss = tm.held_out_loss(accelerator, models, weight_dtype, vae.config.scaling_factor, device)

    def batch_for(step):  # with buckets the latent shape is the step's bucket's
        batch = run.host_batch(plan, dataset, latents, seed, step, accelerator.process_index)
        return [tm.device_batch(batch, micro, prompt_ids, control.timestep_range, vae.config.scaling_factor, device,
                                control.noise_offset)
                for micro in range(plan.accumulation)]

    def interrupted_anywhere(stop):
        flag = torch.tensor([float(stop.requested)], device=device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0) if plan.num_devices > 1 else stop.requested

    def host_sets():
        return [v.detach().float().cpu().numpy() for v in vector_sets]

    def host_vectors():
        """The learned vectors as the output files take them: one array, or SDXL's {"clip_l", "clip_g"}."""
        return run.output_vectors(host_sets())

    run.log_start(logger, plan, dataset, seed,
                  f"processes = {plan.num_devices}, model = {run.describe_encoders(len(vector_sets))}")
    progress = tqdm(range(plan.max_train_steps), initial=step, desc="Steps", disable=not accelerator.is_local_main_process)
    losses = run.LossLog()

    # ---- Loop
    with run.StopSignals() as stop:
        while step < plan.max_train_steps:
            loss, norms = tm.train_step(accelerator, models, optimizer, vector_sets, batch_for(step), lrs[step],
                                        weight_dtype, control, norm_targets)
            losses.add(step + 1, loss, lrs[step], dict(zip(norm_keys, norms)))
            step += 1
            progress.update(1)
            actions = plan.actions(step, interrupted_anywhere(stop))
            if actions.fetch_losses:
                for logged_step, value, lr, extras in losses.fetch(lambda values: torch.stack(values).tolist()):
                    accelerator.log({"loss": value, "lr": lr, **extras}, step=logged_step)
                progress.set_postfix({"loss": f"{losses.history[-1][1]:.4f}", **run.norm_postfix(losses.last_extras),
                                      "lr": f"{lrs[step - 1]:.2e}"})  # in this order: loss, norm(s), lr
                run.check_finite_vectors(host_sets(), step)
            if accelerator.is_main_process:
                if actions.save_embeddings:
                    embeddings.write_diffusers(args.output_dir, args.placeholder_token, host_vectors(),
                                               safe_serialization=not args.no_safe_serialization,
                                               suffix=f"-steps-{step}")
                if actions.save_checkpoint:
                    tensors, state = run.checkpoint_payload(
                        host_sets(), topt.optimizer_state(optimizer, len(vector_sets), optimizer_name), seed, args, plan,
                        "pytorch", optimizer_name)
                    logger.info("saved %s", checkpoints.save_checkpoint(args.output_dir, step, tensors, state,
                                                                        args.checkpoints_total_limit))
                if actions.validate:
                    run_validation(args, accelerator, models, step)
                if actions.evaluate:  # the held-out loss and/or the CLIP scores (eval.json)
                    accelerator.log(evaluation.after_step(step, actions, held_out_loss), step=step)
            accelerator.wait_for_everyone()
            if actions.stop:
                progress.close()
                logger.warning("stopped by signal at step %d; resume with --resume_from_checkpoint latest", step)
                accelerator.end_training()
                return 130
    progress.close()

    # ---- Save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        outputs.finish_run(args, host_vectors(), step, losses.history, hub_repo_id,
                           lambda: save_full_pipeline(args, args.output_dir, models, host_vectors(),
                                                      [ids for ids, _ in added]),
                           logger, evaluation=evaluation)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
