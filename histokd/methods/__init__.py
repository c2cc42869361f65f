"""Training methods: :class:`~histokd.methods.base.Method` subclasses whose ``fit`` trains them.

Each registers itself in :data:`histokd.registry.METHODS` under the name a run config
gives as ``model.method``.
"""

from histokd.methods.base import Method
from histokd.methods.distiller import Distiller, StageAligner
from histokd.methods.joint_embedding import JointEmbedding, SimCLR, VICReg
from histokd.methods.moby import MoBY
from histokd.methods.supervised import Supervised

__all__ = ["Distiller", "JointEmbedding", "Method", "MoBY", "SimCLR", "StageAligner", "Supervised", "VICReg"]
