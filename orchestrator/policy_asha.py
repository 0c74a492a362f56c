"""ASHA for the finetune sweep: early stopping that compares a policy's trials only with each other."""
from __future__ import annotations

from ray.tune.schedulers.async_hyperband import AsyncHyperBandScheduler, _Bracket


class PolicyASHA(AsyncHyperBandScheduler):
    """ASHA on the held-out ``val_top1`` with one bracket per policy (``trial.config["policy_id"]``):
    a trial is stopped only for trailing the same policy's other learning rates, never for being a
    cheaper policy — low-BitOps policies score lower by design, and one shared bracket would prune the
    low end of the frontier. Stopped trials are recorded as such and never reported as finished."""

    def __init__(self, max_t: int, grace_period: int = 1, reduction_factor: float = 4):
        super().__init__(time_attr="training_iteration_epochs", metric="val_top1", mode="max", max_t=max_t,
                         grace_period=grace_period, reduction_factor=reduction_factor)
        self._bracket_args = (grace_period, max_t, reduction_factor)
        self._per_policy: dict[str, _Bracket] = {}

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)  # validates metric and mode
        pid = trial.config["policy_id"]
        if pid not in self._per_policy:
            grace, max_t, rf = self._bracket_args
            self._per_policy[pid] = _Bracket(grace, max_t, rf, 0)
        self._trial_info[trial.trial_id] = self._per_policy[pid]
