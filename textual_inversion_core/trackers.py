"""Which experiment trackers a run logs to (decided before any model is loaded)."""

import importlib.util

from .errors import UserError

# tracker name -> the module it needs (TensorBoard also works through tensorboardX)
_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}


def _installed(tracker):
    for module in _MODULES[tracker]:
        try:
            if importlib.util.find_spec(module) is not None:
                return True
        except ValueError:  # imported already, without a spec (e.g. a stand-in module): it is there
            return True
    return False


def select_trackers(report_to, supported=("tensorboard", "wandb", "comet_ml"), trainer="this trainer"):
    """The trackers of --report_to. "all" means the installed ones of `supported` (as in Accelerate);
    a tracker named on its own must be installed."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [t for t in supported if _installed(t)]
    if report_to not in supported:
        raise UserError(f"--report_to {report_to} is not supported by {trainer}; use {', '.join(supported)}, all or none")
    if not _installed(report_to):
        module = _MODULES[report_to][0]
        raise UserError(f"--report_to {report_to} needs the {module} package; pip install {module} or pass --report_to none")
    return [report_to]
