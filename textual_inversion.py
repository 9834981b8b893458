#!/usr/bin/env python
"""Textual Inversion for Stable Diffusion (SD-1.x/2.x, SDXL, SD3/SD3.5, Flux.1) with PyTorch and Accelerate.

    accelerate launch textual_inversion.py --pretrained_model_name_or_path=MODEL \
        --train_data_dir=DIR --placeholder_token="<cat-toy>" --initializer_token="toy" ...

Reads top to bottom: parse -> load -> prepare -> loop -> save. Only the placeholder vectors are
trainable; everything else is frozen. VAE posteriors are cached per (image, flip), so the VAE
encoder runs once per image instead of once per step. All randomness of an example (image order,
flip, template, posterior sample, noise, timestep) is keyed by its global index, which makes
resuming exact and a run on N processes equal to one process with the same global batch.
The model family (SD-1.x/2.x, SDXL, SD3/SD3.5, Flux.1) is told once from model_index.json; each has one
module in torch_backend/families/ saying what it loads, how a prompt becomes conditioning and its loss
(DDPM or flow matching). Every trained text encoder's tokenizer gets the placeholder tokens and the
encoder its own trainable vectors; a frozen encoder (T5 without --enable_t5_ti) is run once per distinct
prompt, its outputs cached, and freed. The step arithmetic, checkpoints and the loop's bookkeeping
are textual_inversion_core.run, shared with textual_inversion_flax.py; the PyTorch parts are in torch_backend/.
"""

import importlib.util
import logging
import os
import sys
import warnings

from textual_inversion_core import checkpoints, controls, embeddings, eval_record, flow_matching, hub, outputs, run
from textual_inversion_core.cli import parse_args, public_config
from textual_inversion_core.errors import UserError, run_cli
from textual_inversion_core.preflight import fit_init_vectors, load_run_inputs
from textual_inversion_core.schedules import lr_table
from textual_inversion_core.tokens import initializer_vectors, placeholder_string
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


def main(argv=None, prog="textual_inversion.py"):
    args = parse_args(argv, prog=prog)

    # ---- Checks that need no model: fail in seconds, not after importing torch and loading gigabytes.
    check_xformers(args)
    optimizer_name = run.ADAMW_8BIT if args.use_8bit_adam else run.ADAMW
    if args.use_8bit_adam:  # bitsandbytes and CUDA
        from torch_backend.optimizer import check_8bit_adam

        check_8bit_adam()
    trackers = select_trackers(args.report_to)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from torch_backend import families, hosts, scores
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

    # ---- Load: the family (from model_index.json) says what; tokenizers first, so a placeholder or initializer
    # a vocabulary refuses stops the run before any big model loads. A model missing on one machine stops every one.
    family = processes.agree(lambda: families.select(args))
    flow_matching.check_for_family(args, family.spec)  # (preflight did, if model_index.json was on this machine)
    family.check_model_configs()
    tokenizers = processes.agree(family.load_tokenizers)
    # The placeholder tokens go into the tokenizer of every trained encoder. A frozen encoder reads the prompts as a
    # pipeline without this embedding would: the placeholder as plain text.
    added = family.add_placeholders(tokenizers)
    prompt_ids = []
    for i, tokenizer in enumerate(tokenizers):
        text = placeholder_string(tokenizer, added[i][0]) if i in added else args.placeholder_token
        dataset.tokenize(tokenizer, text, max_length=family.max_length(i, tokenizer), trained=i in added)
        prompt_ids.append(torch.from_numpy(dataset.all_prompt_ids))
    models = processes.agree(lambda: family.load_text_side(tokenizers))

    # ---- Prepare: freeze everything, then make the placeholder vectors of each trained encoder the trainable tensors.
    text_encoders = models.text_encoders
    tm.freeze(text_encoders)
    tables = {i: text_encoders[i].get_input_embeddings().weight.data for i in family.trained}
    starts = fit_init_vectors(args, inputs.init_vectors, [tables[i].shape[1] for i in family.trained])
    for n, i in enumerate(family.trained):
        if starts[n] is None:  # the initializer word's embedding, or a phrase's (tokens.initializer_rows)
            starts[n] = initializer_vectors(tables[i].float().numpy(), added[i][1], args.num_vectors)
    del tables

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    tm.place(text_encoders, device, weight_dtype)
    # Inserted after the cast, so the trainable vectors are the fp32 start vectors themselves (never rounded
    # through fp16/bf16); the rest of each text encoder runs in weight_dtype.
    vector_sets = []
    for n, i in enumerate(family.trained):
        # T5's table has spare rows past its tokenizer's vocabulary: the new tokens' ids may already fit
        rows = max(len(tokenizers[i]), text_encoders[i].get_input_embeddings().weight.shape[0])
        vector_sets.append(tm.insert_placeholder_embedding(text_encoders[i], rows, added[i][0], starts[n]).vectors)
    # A frozen encoder (T5 without --enable_t5_ti) reads fixed prompts: run it once per prompt, keep its outputs, free it.
    family.cache_frozen_encoders(models, prompt_ids, device)
    prompt_ids = [prompt_ids[i] for i in family.trained]
    processes.agree(lambda: family.load_image_side(models, weight_dtype))
    vae, denoiser = models.vae, models.denoiser
    tm.freeze((vae, denoiser))
    vae.to(device, dtype=torch.float32)  # fp32: its posterior is computed once per image and cached exactly
    denoiser.to(device, dtype=weight_dtype)
    denoiser.eval()
    if args.enable_xformers_memory_efficient_attention:
        tm.enable_xformers_attention(models)
    if args.gradient_checkpointing:
        # Both only checkpoint in train mode; neither has dropout in SD configs, so outputs are the same.
        for i in family.trained:
            text_encoders[i].gradient_checkpointing_enable()
            text_encoders[i].train()
        denoiser.enable_gradient_checkpointing()
        denoiser.train()

    plan = run.make_plan(args, len(dataset), accelerator.num_processes)
    lrs = lr_table(args.lr_scheduler, args.lr_warmup_steps, plan.max_train_steps, args.lr_num_cycles,
                   plan.learning_rate)
    optimizer = topt.make_optimizer(args, vector_sets, plan.learning_rate)
    optimizer = accelerator.prepare(optimizer)
    trained_keys = [family.spec.encoders[i].file_key for i in family.trained]
    checkpoint_family = run.family_state(family.spec, trained_keys)
    if inputs.resume_state is not None:  # (preflight checked it already when model_index.json was on this machine)
        run.check_checkpoint_family(inputs.resume_path, inputs.resume_tensors, inputs.resume_state, family.spec,
                                    trained_keys)
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
        evaluation = eval_record.start(args, inputs, [tokenizers[i] for i in family.trained],
                                       [added[i][0] for i in family.trained], tm.encode_posteriors(vae, device),
                                       control.timestep_range, paper)
    held_out_loss = tm.held_out_loss(accelerator, family, models, weight_dtype, device)

    def batch_for(step):  # with buckets the latent shape is the step's bucket's
        batch = run.host_batch(plan, dataset, latents, seed, step, accelerator.process_index)
        return [family.device_batch(batch, micro, prompt_ids, control, models, device)
                for micro in range(plan.accumulation)]

    def interrupted_anywhere(stop):
        flag = torch.tensor([float(stop.requested)], device=device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0) if plan.num_devices > 1 else stop.requested

    def host_sets():
        return [v.detach().float().cpu().numpy() for v in vector_sets]

    def host_vectors():
        """The learned vectors as the output files take them (the family says: SD-1.x one array, else {file key: array})."""
        return family.output_vectors(host_sets())

    run.log_start(logger, plan, dataset, seed,
                  f"processes = {plan.num_devices}, {family.describe(models)}")
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
                                               suffix=f"-steps-{step}", family=family.spec)
                if actions.save_checkpoint:
                    tensors, state = run.checkpoint_payload(
                        host_sets(), topt.optimizer_state(optimizer, len(vector_sets), optimizer_name), seed, args, plan,
                        "pytorch", optimizer_name, checkpoint_family)
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
                                                      [added[i][0] for i in family.trained]),
                           logger, family=family.spec, evaluation=evaluation)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
