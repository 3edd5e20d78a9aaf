"""Small builders shared by the loss tests."""

import torch

F64 = torch.float64


def t(*values, dtype=F64):
    """A 1-D tensor of ``values`` (float64 unless told)."""
    return torch.tensor(values, dtype=dtype)


def sequence_inputs(pc, pr, rc, rr):
    """The four summed log-probs as ``compute_loss`` keywords."""
    return dict(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        reference_chosen_logps=rc,
        reference_rejected_logps=rr,
    )
