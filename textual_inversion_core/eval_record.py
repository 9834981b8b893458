"""eval.json and eval.png: what was measured at each step, kept across resumes, and the plot of it.

Framework-free. eval.json = {"validation": what the loss is measured on, "steps": {"N": {"validation_loss",
"validation_baseline", "reconstruction", "editability", "samples", "embedding"}}, "initializer": the initializer's
words' scores, "run": the settings the evaluate command reads back, "final_step": the step of learned_embeds.*,
"best": the --select_best pick}. It is rewritten atomically after every measurement and read back when a run
resumes (or is scored again): the validation loss is measured again at the steps the resumed run reaches (the same
numbers: the draws are fixed), the CLIP scores of a step already scored are kept.
"""

import json
import os

from . import atomic, plots
from .errors import UserError

FILE = "eval.json"
PLOT = "eval.png"


def embedding_file(output_dir, step):
    """The learned_embeds-steps-N file of a step (safetensors first), or None."""
    for ext in ("safetensors", "bin"):
        name = f"learned_embeds-steps-{step}.{ext}"
        if os.path.isfile(os.path.join(output_dir, name)):
            return name
    return None


def final_embedding_file(output_dir):
    """learned_embeds.safetensors (or .bin): the final step's file."""
    for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
        if os.path.isfile(os.path.join(output_dir, name)):
            return name
    return None


class EvalRecord:
    """eval.json of an output folder: read when present, updated step by step, written atomically."""

    def __init__(self, output_dir, fresh=False):
        """fresh: start a new record even if the folder has one (a new run into an old --output_dir)."""
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, FILE)
        self.data = {"steps": {}}
        if os.path.isfile(self.path) and not fresh:
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.data = json.load(f)
            except (OSError, ValueError) as err:
                raise UserError(f"{self.path} is not readable JSON ({err}); move it away to start the record again") \
                    from None
            self.data.setdefault("steps", {})

    @property
    def steps(self):
        """{step (int): entry}, in step order."""
        return {int(k): v for k, v in sorted(self.data["steps"].items(), key=lambda kv: int(kv[0]))}

    def check_validation(self, described):
        """A resumed run must measure on the held-out images it measured on before."""
        stored = self.data.get("validation")
        if stored and stored.get("images") != described["images"]:
            raise UserError(f"the held-out images ({', '.join(described['images'])}) are not those {self.path} was "
                            f"measured on ({', '.join(stored.get('images') or [])}); resume with the run's --seed / "
                            "--validation_seed and data, or use a new --output_dir")
        self.data["validation"] = described

    def update(self, step, values, keep=False):
        """Merge values into the step's entry (keep=True: values already there win) and write the file."""
        entry = self.data["steps"].setdefault(str(step), {})
        for key, value in values.items():
            if not (keep and key in entry):
                entry[key] = value
        embedding = embedding_file(self.output_dir, step)
        if embedding:
            entry["embedding"] = embedding
        self.write()
        return entry

    def write(self):
        atomic.write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        return self.path

    def plot(self):
        """eval.png from the entries (validation loss curve; reconstruction vs editability when scored)."""
        return plots.write_eval_plot(os.path.join(self.output_dir, PLOT), self.steps)


class Evaluation:
    """What a trainer's loop (and the evaluate command) calls, on the main process only: after_step(step, actions,
    loss_of) at the plan's evaluation steps, finish(step) at the end.

    validation_loss: a validation.ValidationLoss (held-out images) or None; paper: an evaluate.PaperScorer (a CLIP
    model) or None; placeholder_text / initializer_text: what stands for the concept in prompts, and the words that
    stand in for it in the initializer's reference scores; run_info: the run's settings the evaluate command reads
    back (eval.json "run")."""

    def __init__(self, output_dir, validation_loss=None, paper=None, resuming=False, placeholder_text=None,
                 initializer_text=None, run_info=None):
        self.output_dir, self.loss, self.paper = output_dir, validation_loss, paper
        self.placeholder_text, self.initializer_text = placeholder_text, initializer_text
        # A resumed run continues its eval.json; a new run into an old --output_dir starts a new one.
        self.record = EvalRecord(output_dir, fresh=not resuming)
        if validation_loss is not None:
            self.record.check_validation(validation_loss.describe())
        if run_info:
            self.record.data["run"] = run_info

    def after_step(self, step, actions, loss_of=None):
        """Measure what the step's actions ask for, write eval.json; returns the values for the trackers (the
        validation loss under kohya's name loss/validation)."""
        logged = {}
        if actions.validation_loss and self.loss is not None:
            values = self.loss.measure(loss_of)
            self.record.update(step, values)
            logged.update({"loss/validation": values["validation_loss"],
                           "loss/validation_baseline": values["validation_baseline"]})
        if actions.paper_scores and self.paper is not None:
            entry = self.score(step)
            logged.update({"eval/reconstruction": entry["reconstruction"], "eval/editability": entry["editability"]})
        return logged

    def score(self, step):
        """The paper scores of the current vectors as step `step`, unless eval.json has them already (kept); the
        initializer's reference scores once. Returns the step's entry."""
        if "initializer" not in self.record.data and self.initializer_text:
            self.record.data["initializer"] = self.paper(self.initializer_text)
        entry = self.record.steps.get(step, {})
        if "reconstruction" in entry:
            return entry
        return self.record.update(step, self.paper(self.placeholder_text), keep=True)

    def finish(self, final_step, choose=None):
        """eval.json (with the step of learned_embeds.*) and eval.png; with choose(record) (best.py) the best step's
        files too. Returns the paths written."""
        if final_step is not None:
            self.record.data["final_step"] = int(final_step)
            entry = self.record.data["steps"].get(str(final_step))
            if entry is not None and not entry.get("embedding"):  # measured at the last step, not a save step
                entry["embedding"] = final_embedding_file(self.output_dir)
        written = []
        if choose is not None:
            written += choose(self.record)
        return [self.record.write(), self.record.plot()] + written


def run_info(args):
    """The settings the evaluate command needs to score this run's files again (eval.json "run")."""
    from .validation import validation_seed

    return {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "train_data_dir": args.train_data_dir,
            "resolution": args.resolution, "center_crop": args.center_crop, "recursive": args.recursive,
            "learnable_property": args.learnable_property, "placeholder_token": args.placeholder_token,
            "initializer_token": args.initializer_token, "seed": validation_seed(args),
            "eval_num_samples": args.eval_num_samples, "eval_inference_steps": args.eval_inference_steps,
            "export_formats": list(args.export_formats), "safe_serialization": not args.no_safe_serialization,
            "revision": args.revision, "variant": args.variant}


def wanted(args):
    """Whether the run evaluates anything: held-out images, a CLIP model or --select_best."""
    return bool(args.validation_split is not None or args.validation_data_dir or args.eval_clip_model
                or args.select_best)


def start(args, inputs, tokenizers, placeholder_id_sets, encode, timestep_range, paper=None):
    """The run's Evaluation, or None when nothing is evaluated. tokenizers: the run's, with the placeholder tokens;
    placeholder_id_sets: their ids in each tokenizer; encode: the trainer's posterior encoder; paper: the
    PaperScorer (--eval_clip_model, PyTorch) or None."""
    if not wanted(args):
        return None
    from .tokens import placeholder_string
    from .validation import ValidationLoss

    placeholder_strings = [placeholder_string(t, ids) for t, ids in zip(tokenizers, placeholder_id_sets)]
    loss = None
    if inputs.validation is not None:
        loss = ValidationLoss(inputs.validation, tokenizers, placeholder_strings, args.initializer_token, encode,
                              timestep_range, args.train_batch_size)
    return Evaluation(args.output_dir, loss, paper, resuming=inputs.resume_state is not None,
                      placeholder_text=placeholder_strings[0], initializer_text=args.initializer_token,
                      run_info=run_info(args))
