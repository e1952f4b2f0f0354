"""Optimizers: Muon (+ momentum warm-up), Lion, the Muon/AdamW hybrid set-up and LR schedules."""

from .factory import setup_optimizers, split_parameters
from .lion import Lion
from .muon import Muon, MuonWithWarmup, zeropower_via_newtonschulz5
from .schedules import LRSchedule, get_lr_scheduler, lr_factor

__all__ = ["Lion", "LRSchedule", "Muon", "MuonWithWarmup", "get_lr_scheduler", "lr_factor",
           "setup_optimizers", "split_parameters", "zeropower_via_newtonschulz5"]
