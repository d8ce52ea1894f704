"""netsurgeon: make trained PyTorch networks smaller and faster, and measure it honestly."""

from . import data as data
from . import masks as masks
from . import models as models
from . import pipeline as pipeline
from . import pruning as pruning
from . import quantization as quantization
from . import registry as registry
from . import stats as stats

# storage
from .coding import NszError as NszError
from .coding import read_compressed as read_compressed
from .coding import save_compressed as save_compressed

# data & models
from .data import DataError as DataError
from .data import load_dataset as load_dataset
from .models import build_model as build_model

# methods and pipelines
from .pipeline import Pipeline as Pipeline
from .pipeline import get_method as get_method
from .pipeline import methods as methods
from .runtime import load_compressed as load_compressed

# engine
from .train import Callback as Callback
from .train import TrainConfig as TrainConfig
from .train import evaluate as evaluate
from .train import train as train

__version__ = "0.1.0"
