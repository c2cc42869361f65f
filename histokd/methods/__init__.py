"""Training methods: ``keras.Model`` subclasses whose ``fit`` trains them."""

from histokd.methods.distiller import Distiller, StageAligner
from histokd.methods.joint_embedding import JointEmbedding
from histokd.methods.moby import MoBY, MoBYMLP
from histokd.methods.supervised import Supervised

__all__ = ["Distiller", "JointEmbedding", "MoBY", "MoBYMLP", "StageAligner", "Supervised"]
