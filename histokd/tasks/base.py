"""The ``Task`` base class: evaluation, metrics, plots and export of a trained run."""

from __future__ import annotations


class Task:
    """How a run is evaluated and what it exports.

    A subclass implements :meth:`evaluate`, :meth:`export` and :meth:`summary`, and
    registers itself: ``TASKS.register("name", MyTask)``. The trained model handed to
    it is a :class:`histokd.methods.base.Method`; a task reads it only through the
    method's hooks (``evaluation_model()``, ``branch_encoders()``, ``trained_heads()``,
    ``branch_input_kinds(cfg)``), never by the method's name.
    """

    name = ""

    def evaluate(self, cfg, model, source, run_dir, stain=None, progress=True) -> dict:
        """Evaluate ``model`` on ``source``; returns the results (written to metrics.json)."""
        raise NotImplementedError

    def export(self, cfg, model, results: dict, source, run_dir, stain=None) -> dict:
        """Write ``run_dir/export/``; returns the export metadata."""
        raise NotImplementedError

    def summary(self, results: dict) -> str:
        """A plain-text table of ``results``."""
        raise NotImplementedError


def get_task(name: str) -> Task:
    """An instance of the task registered as ``name``."""
    from histokd.registry import TASKS

    return TASKS.get(name)()


__all__ = ["Task", "get_task"]
