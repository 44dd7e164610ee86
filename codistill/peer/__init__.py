"""A peer: one model, its optimizer and schedule, its data stream and its local teachers. Plain
PyTorch, no ray, no mlflow."""

from codistill.peer.peer import EvalResult, NonFiniteLossError, Peer, StepLoss, StepStats, resolve_device, total_steps

__all__ = ["EvalResult", "NonFiniteLossError", "Peer", "StepLoss", "StepStats", "resolve_device", "total_steps"]
