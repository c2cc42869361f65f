"""Training methods: ``keras.Model`` subclasses whose ``fit`` trains them."""

from histokd.methods.joint_embedding import JointEmbedding
from histokd.methods.supervised import Supervised

__all__ = ["JointEmbedding", "Supervised"]
