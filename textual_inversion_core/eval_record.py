"""eval.json and eval.png: what was measured at each step, kept across resumes, and the plot of it.

Framework-free. eval.json = {"validation": what the loss is measured on, "steps": {"N": {"validation_loss",
"validation_baseline", "embedding", ...}}, "final_step": the step of learned_embeds.*}. It is rewritten
atomically after every measurement and read back when a run resumes (or is scored again): steps already in it
keep what they hold unless measured again (a measurement is deterministic, so it gives the same numbers).
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
    """What a trainer's loop calls: measure(step, loss_of) at the plan's validation_loss steps, on the main process
    (see validation.ValidationLoss), and finish(step) at the end."""

    def __init__(self, output_dir, validation_loss, resuming):
        """resuming: the run continues from a checkpoint, and so does its eval.json (a new run starts a new one)."""
        self.loss = validation_loss
        self.record = EvalRecord(output_dir, fresh=not resuming)
        self.record.check_validation(validation_loss.describe())

    def measure(self, step, loss_of):
        """Measure, write eval.json; returns the values for the trackers (kohya's name loss/validation)."""
        values = self.loss.measure(loss_of)
        self.record.update(step, values)
        return {"loss/validation": values["validation_loss"], "loss/validation_baseline": values["validation_baseline"]}

    def finish(self, final_step):
        """eval.json (with the step of learned_embeds.*) and eval.png; returns their paths."""
        self.record.data["final_step"] = int(final_step)
        return [self.record.write(), self.record.plot()]


def start(args, inputs, tokenizers, placeholder_id_sets, encode, timestep_range):
    """The run's Evaluation, or None without held-out images (--validation_split / --validation_data_dir).
    tokenizers: the run's, with the placeholder tokens; placeholder_id_sets: their ids in each tokenizer."""
    if inputs.validation is None:
        return None
    from .tokens import placeholder_string
    from .validation import ValidationLoss

    placeholder_strings = [placeholder_string(t, ids) for t, ids in zip(tokenizers, placeholder_id_sets)]
    loss = ValidationLoss(inputs.validation, tokenizers, placeholder_strings, args.initializer_token, encode,
                          timestep_range, args.train_batch_size)
    return Evaluation(args.output_dir, loss, resuming=inputs.resume_state is not None)
