"""jaxrnn: backpropagation through time you can read, run, check and measure."""

from jaxrnn._src.activations import ACTIVATIONS
from jaxrnn._src.autodiff import autodiff_bptt
from jaxrnn._src.bptt import backward_deltas, bptt
from jaxrnn._src.checks import validate_inputs
from jaxrnn._src.params import LayerParams, Readout, RNNParams, init_params
from jaxrnn._src.rnn import elman_step, forward, loss

__version__ = "0.1.0"

__all__ = (
    "ACTIVATIONS",
    "LayerParams",
    "RNNParams",
    "Readout",
    "autodiff_bptt",
    "backward_deltas",
    "bptt",
    "elman_step",
    "forward",
    "init_params",
    "loss",
    "validate_inputs",
)
