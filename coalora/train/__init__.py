"""Configuration-aware training (CoA-LoRA) and the baselines, with one loop, checkpoints and resume.

    methods     the methods as a table (coalora, qlora, lqlora, shared, qlora-bnb)
    batches     LM batches: packed C4-schema text, or instruction data with response-only loss
    targets     the training pool and the target set every method is trained for
    loop        Trainer: the one training loop (K configs per step, losses summed), checkpointing
    checkpoint  safetensors + JSON checkpoints, digest-verified, atomic; optimizer and RNG state
    heldout     the split of the training data: training batches, the held-out batch, the f1 slice
    runner      one method's runs (per-config or joint), resumable; models built by coalora.model.rebuild
"""

from coalora.train.loop import LoopSettings, Trainer, eval_losses
from coalora.train.methods import METHODS, Method
from coalora.train.runner import MethodResult, RunResult, TrainSetup, train_method
from coalora.train.targets import load_pool, target_set

__all__ = ["METHODS", "LoopSettings", "Method", "MethodResult", "RunResult", "TrainSetup", "Trainer",
           "eval_losses", "load_pool", "target_set", "train_method"]
