"""Stage ``data``: the text, instruction data and benchmarks every later stage reads (layout.py).

``data.source: embedded`` generates the offline world from ``seed`` and ``world``; ``data.source: hub``
loads C4, the instruction set and the four benchmarks through Hugging Face ``datasets`` (or local copies).
Both write the same files, so nothing downstream knows which one ran.
"""

from __future__ import annotations

from coalora.params import Params
from coalora.stages.core import Stage, StageContext


def build_data(params: Params, ctx: StageContext) -> dict:
    """Write the data layout into ``ctx.out`` and return its summary (counts, label balance)."""
    if params.data.source == "embedded":
        from coalora.data.embedded import write_embedded
        return write_embedded(params, ctx.out)
    from coalora.data.hub import write_hub
    return write_hub(params, ctx.out, root=ctx.root)


STAGE = Stage(
    name="data",
    fn=build_data,
    params=("seed", "world", "data"),
    code=("coalora/data", "coalora/stages/data.py"),
    description="text, instruction data and benchmarks: the embedded world or Hugging Face datasets",
)
