"""Padding values of ragged batches (moetrace.torch.collate), kept free of PyTorch so that they can be
read and tested without it.

Labels follow the ecosystem's convention: -100, the `ignore_index` of torch.nn.CrossEntropyLoss and
of Hugging Face models, so a padded batch can go straight into a loss. Token inputs pad with 0
(T5's <pad>), booleans with False and floats with 0.0; the masks (`attention_mask`, `dec_mask`) say
which positions are real.
"""

from __future__ import annotations

LABEL_PAD = -100
# Per field (the part after the last '.': 'enc.1.expert' -> 'expert').
PAD_VALUES = {
    "token_ids": 0,            # encoder input (T5 <pad> = 0)
    "dec_input_ids": 0,        # decoder input
    "dec_output_ids": LABEL_PAD,  # generated tokens: the decoder's labels
    "expert": LABEL_PAD,       # the routing target of an expert predictor
    "dropped": False,
}


def pad_value(key: str):
    """The padding value of a batch key ('token_ids', 'enc.1.expert', 'enc.1.router_logits', ...)."""
    return PAD_VALUES.get(key.rsplit(".", 1)[-1], 0)
