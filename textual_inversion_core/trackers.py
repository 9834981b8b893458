"""Which experiment trackers a run logs to (decided before any model is loaded)."""

import configparser
import importlib.util
import netrc
import os
from urllib.parse import urlsplit

from .errors import UserError

# tracker name -> the module it needs (TensorBoard also works through tensorboardX)
_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}
WANDB_DEFAULT_HOST = "https://api.wandb.ai"


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
    a tracker named on its own must be installed. wandb must be able to log in (or be offline)."""
    if report_to == "none":
        return []
    if report_to == "all":
        chosen = [t for t in supported if _installed(t)]
    elif report_to not in supported:
        raise UserError(f"--report_to {report_to} is not supported by {trainer}; use {', '.join(supported)}, all or none")
    elif not _installed(report_to):
        module = _MODULES[report_to][0]
        raise UserError(f"--report_to {report_to} needs the {module} package; pip install {module} or pass --report_to none")
    else:
        chosen = [report_to]
    if "wandb" in chosen and not wandb_can_log():
        others = [t for t in supported if t != "wandb"]
        which = "--report_to all includes wandb (it is installed), which" if report_to == "all" else "--report_to wandb"
        raise UserError(f"{which} has no login on this machine (no WANDB_API_KEY, no netrc entry for "
                        f"{urlsplit(wandb_host()).netloc}); run `wandb login`, set WANDB_MODE=offline, or choose "
                        f"another tracker (--report_to {others[0]} or none)")
    return chosen


def _wandb_settings():
    """The [default] keys of wandb's settings files, as wandb reads them: the global file ($WANDB_CONFIG_DIR/settings,
    else ~/.config/wandb/settings), then the workspace's (wandb/settings or .wandb/settings under $WANDB_DIR, else the
    current folder; `wandb offline` writes mode there), which wins."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
    root = os.path.expanduser(os.environ.get("WANDB_DIR") or os.getcwd())
    workspace = os.path.join(root, ".wandb" if os.path.exists(os.path.join(root, ".wandb")) else "wandb", "settings")
    values = {}
    for path in (os.path.join(os.path.expanduser(config_dir), "settings"), workspace):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # wandb prints its own error for a broken file and goes on without it
        if parser.has_section("default"):
            values.update(parser.items("default"))
    return values


def wandb_host(settings=None):
    settings = _wandb_settings() if settings is None else settings
    return os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or WANDB_DEFAULT_HOST


def _netrc_password(host):
    """The password of the netrc entry for host's address, where wandb looks ($NETRC, ~/.netrc, ~/_netrc)."""
    path = os.environ.get("NETRC") or next((p for p in ("~/.netrc", "~/_netrc") if os.path.exists(os.path.expanduser(p))),
                                           "~/.netrc")
    try:
        entry = netrc.netrc(os.path.expanduser(path)).authenticators(urlsplit(host).netloc)
    except (netrc.NetrcParseError, OSError):  # absent or unreadable: wandb finds no key there either
        return None
    return entry[2] if entry else None


def wandb_can_log():
    """True when wandb.init() would run without an interactive login, decided as wandb does and without the
    network: offline/disabled mode (WANDB_MODE, or the settings files), WANDB_API_KEY, an identity token file,
    a netrc entry for the server, or an api_key in the settings files. Whether the key is valid is wandb's to say."""
    settings = _wandb_settings()
    mode = os.environ.get("WANDB_MODE") or settings.get("mode", "online")
    if mode in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    return bool(_netrc_password(wandb_host(settings)) or settings.get("api_key"))
