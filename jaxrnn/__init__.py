"""jaxrnn: backpropagation through time you can read, run, check and measure."""

from jaxrnn._src.activations import ACTIVATIONS
from jaxrnn._src.autodiff import autodiff_bptt
from jaxrnn._src.bptt import backward_deltas, bptt
from jaxrnn._src.checks import validate_inputs
from jaxrnn._src.params import LayerParams, Readout, RNNParams, init_params
from jaxrnn._src.persist import load_latest as load_latest_checkpoint
from jaxrnn._src.persist import save as save_checkpoint
from jaxrnn._src.persist import start_from as start_from_checkpoint
from jaxrnn._src.rnn import elman_step, forward, loss
from jaxrnn._src.train import FitResult, NonFiniteError, StepMetrics, fit, make_train_step
from jaxrnn._src.stream import StreamState, TBPTTStream, make_tbptt_stream

__version__ = "0.1.0"

__all__ = (
    "ACTIVATIONS",
    "FitResult",
    "LayerParams",
    "NonFiniteError",
    "RNNParams",
    "Readout",
    "StepMetrics",
    "StreamState",
    "TBPTTStream",
    "autodiff_bptt",
    "backward_deltas",
    "bptt",
    "elman_step",
    "fit",
    "forward",
    "init_params",
    "load_latest_checkpoint",
    "loss",
    "make_tbptt_stream",
    "make_train_step",
    "save_checkpoint",
    "start_from_checkpoint",
    "validate_inputs",
)
