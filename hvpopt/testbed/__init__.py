"""The testbed: built-in models, data, tasks, a training loop and checkpoints.

What the experiments, benchmarks and the command line run on. It uses the
library (:mod:`hvpopt.curvature`, :mod:`hvpopt.optim`, ...) and the library
never uses it: a loss of your own needs none of this.

- :mod:`~hvpopt.testbed.models`: small flax NNX models as pure ``model_fn(params, inputs)``.
- :mod:`~hvpopt.testbed.data`: a shipped character corpus and synthetic tasks (nothing downloaded).
- :mod:`~hvpopt.testbed.tasks`: a model, a loss and data in one :class:`~hvpopt.testbed.tasks.Task`.
- :mod:`~hvpopt.testbed.training`: the training loop of ``hvpopt train``, single or multi-device.
- :mod:`~hvpopt.testbed.checkpoint`: msgpack checkpoints with a JSON config.
- :mod:`~hvpopt.testbed.demo`: the curvature tour of ``hvpopt demo``.
- :mod:`~hvpopt.testbed.files`, :mod:`~hvpopt.testbed.interrupts`, :mod:`~hvpopt.testbed.progress`:
  atomic writes and folder locks, Ctrl-C at safe points, a progress bar.
"""

from hvpopt.testbed import checkpoint, data, demo, files, interrupts, models, progress, tasks, training

__all__ = ["checkpoint", "data", "demo", "files", "interrupts", "models", "progress", "tasks", "training"]
