"""Losses: pure functions of tensors (keras.ops), plus Keras ``Loss`` wrappers."""

from histokd.losses.distillation import distillation_loss, kd_kl
from histokd.losses.moby import moby_loss
from histokd.losses.ntxent import NTXentLoss, nt_xent
from histokd.losses.vicreg import VICRegLoss, vicreg_terms

__all__ = ["NTXentLoss", "nt_xent", "VICRegLoss", "vicreg_terms", "moby_loss", "kd_kl",
           "distillation_loss"]
