"""The optimizer of the vectors (AdamW, or bitsandbytes' AdamW8bit with --use_8bit_adam) and its state in and out of
checkpoints.

AdamW's state goes out as its two moments (AdamMoments), the names both trainers share. AdamW8bit's goes out as the
optimizer keeps it (Adam8bitState): for a set of 4096 values or more its moments are uint8 codes with per-block
scales, and only those codes, restored as they were, continue the run exactly.
"""

import numpy as np
import torch

from textual_inversion_core.errors import UserError
from textual_inversion_core.run import ADAM_8BIT_TENSORS, ADAMW, ADAMW_8BIT, Adam8bitState, AdamMoments

# bitsandbytes (0.4x and later) nests a parameter's quantisation tensors under this key in state_dict();
# older releases keep them at the top level. Both are read.
BNB_NESTED_STATE = "__bnb_optimizer_quant_state__"


def cuda_available():
    """The guard of --use_8bit_adam: bitsandbytes' AdamW8bit is supported on CUDA GPUs."""
    return torch.cuda.is_available()


def check_8bit_adam():
    """--use_8bit_adam needs bitsandbytes and a CUDA GPU: one line, before any model loads, when either is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UserError("--use_8bit_adam needs bitsandbytes; pip install bitsandbytes (CUDA) or drop the flag "
                        "(the learned vectors are a few thousand numbers: plain AdamW costs kilobytes)") from err
    if not cuda_available():
        raise UserError("--use_8bit_adam needs a CUDA GPU for bitsandbytes' AdamW8bit; drop the flag on this machine")


def make_optimizer(args, vector_sets, learning_rate):
    """AdamW over the vector sets; --use_8bit_adam takes bitsandbytes' AdamW8bit where it works (CUDA).

    bitsandbytes keeps 32-bit state for tensors under 4096 values, which covers up to 5 CLIP-L vectors, so
    the flag saves next to nothing there; it is accepted so diffusers' SDXL command lines run unchanged."""
    options = dict(lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                   eps=args.adam_epsilon)
    if not args.use_8bit_adam:
        return torch.optim.AdamW(vector_sets, **options)
    check_8bit_adam()
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(vector_sets, **options)


def _parameter_states(optimizer, count):
    """The state_dict() state of each of the count parameters, bitsandbytes' nested tensors brought to the top."""
    states = optimizer.state_dict()["state"]
    flat = []
    for i in range(count):
        state = dict(states.get(i) or {})
        state.update(state.pop(BNB_NESTED_STATE, {}))
        flat.append(state)
    return flat


def optimizer_state(optimizer, count, name=ADAMW):
    """The state of each of the `count` vector sets (None before the first step): AdamMoments for AdamW,
    Adam8bitState (bitsandbytes' own tensors, uint8 codes included) for AdamW8bit."""
    states = _parameter_states(optimizer, count)
    if not states[0]:
        return None
    if name == ADAMW_8BIT:
        return [Adam8bitState({key: state[key].detach().cpu().numpy().copy() for key in ADAM_8BIT_TENSORS
                               if isinstance(state.get(key), torch.Tensor)}, int(state["step"]))
                for state in states]
    return [AdamMoments(state["exp_avg"].float().cpu().numpy(), state["exp_avg_sq"].float().cpu().numpy(),
                        int(float(state["step"]))) for state in states]


def load_optimizer_state(optimizer, sets, device):
    """Put a checkpoint's optimizer state (from optimizer_state, through the checkpoint) back into the optimizer."""
    state = optimizer.state_dict()
    if isinstance(sets[0], Adam8bitState):
        # bitsandbytes counts steps in a Python int and reads the tensors (uint8 codes, maps, block scales) as given.
        state["state"] = {i: {"step": int(adam.step),
                              **{key: torch.from_numpy(np.array(value)).to(device) for key, value in adam.tensors.items()}}
                          for i, adam in enumerate(sets)}
    else:
        state["state"] = {i: {"step": torch.tensor(float(adam.step)),
                              "exp_avg": torch.from_numpy(np.asarray(adam.exp_avg)).to(device),
                              "exp_avg_sq": torch.from_numpy(np.asarray(adam.exp_avg_sq)).to(device)}
                          for i, adam in enumerate(sets)}
    optimizer.load_state_dict(state)
