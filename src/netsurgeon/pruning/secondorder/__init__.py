"""Second-order one-shot pruning (OBD, diagonal Fisher, OBS, WoodFisher, WoodTaylor, K-FAC): one config
(``config.py``), curvature estimators behind one interface (``curvature.py``; the bounded-memory WoodFisher in
``lowmem.py``; the sharded gradient exchange in ``sharded.py``) and the pruner that composes an estimator with a
saliency, a global selection and an update (``pruner.py``). The methods are registered in
:mod:`netsurgeon.pruning.woodfisher`."""

from .config import FisherConfig as FisherConfig
from .config import SecondOrderConfig as SecondOrderConfig
from .config import config_for as config_for
from .curvature import Curvature as Curvature
from .curvature import DiagonalFisher as DiagonalFisher
from .curvature import ExactHessian as ExactHessian
from .curvature import KroneckerFisher as KroneckerFisher
from .curvature import WoodburyFisher as WoodburyFisher
from .lowmem import LowMemoryWoodbury as LowMemoryWoodbury
from .pruner import METHODS as METHODS
from .pruner import OneShotPruner as OneShotPruner
from .pruner import available_memory as available_memory
from .pruner import one_shot_prune as one_shot_prune
