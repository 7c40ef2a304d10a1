"""What a compiled XLA program will hold in memory, known before it runs.

``jax.jit(f).lower(*args).compile()`` compiles without running, and arguments
may be :class:`jax.ShapeDtypeStruct` instead of arrays; XLA's buffer assignment
then says how many bytes the program's arguments, outputs and temporaries take.
A later call of the same jitted function at the same shapes reuses the
compilation.
"""

from collections.abc import Callable
from typing import NamedTuple

__all__ = ["ProgramMemory", "program_memory"]


class ProgramMemory(NamedTuple):
    """Bytes of one compiled program: its arguments, its outputs and its temporaries (all live at its peak)."""

    arguments: int
    outputs: int
    temporaries: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries


def program_memory(jitted: Callable, *args, **kwargs) -> ProgramMemory | None:
    """The memory of ``jitted(*args, **kwargs)``, compiled ahead of time and not run; None where the backend
    does not say.

    Example:
      >>> import jax, jax.numpy as jnp, hvpopt
      >>> square = jax.jit(lambda x: x @ x.T)
      >>> hvpopt.program_memory(square, jax.ShapeDtypeStruct((100, 10), jnp.float32)).outputs
      40000
    """
    stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    if stats is None:
        return None
    return ProgramMemory(stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes)
