"""θ, the configuration-aware network (METHOD.md §3): a layer's spec and identity → an r × r matrix U.

For every quantized layer i, θ reads seven small integers: the indices of its spec's five fields into their
allowed values (``SPEC_FIELDS`` order), its transformer block index and its matrix type, and returns

    e_i = [E_b0(b0) ‖ E_b1(b1) ‖ E_b2(b2) ‖ E_B0(B0) ‖ E_B1(B1) ‖ E_blk(block) ‖ E_typ(type)]   (7·d,)
    M_i = Linear₂(SiLU(Linear₁(LayerNorm(e_i))))                                                 (r·r,) → (r, r)
    U_i = I + s·M_i

with d = ``embed_dim``, Linear₁: 7·d → ``hidden``, Linear₂: ``hidden`` → r·r and s a learned scalar. The
layer's LoRA update becomes ΔW_i = (α/r)·B_i·U_i·A_i.

Initialisation: Linear₂'s weights ~ N(0, init_std²) and its bias is zero, so M ≈ 0 and U ≈ I: CoA-LoRA starts
as plain LoRA. s starts at 1.0: it is redundant with Linear₂'s scale at init, but a separate scalar lets the
optimiser grow or shrink the whole correction in one coordinate (AdamW moves every parameter by ~lr per
step, so a tiny Linear₂ alone would need many steps to reach a useful magnitude).

The vocabularies (number of blocks, matrix types) come from the model's quantized layer names
(:func:`vocabulary`), never from a hard-coded list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from coalora.quant import SPEC_FIELDS, QuantSpec

# Components of a module path that hold the list of transformer blocks: Llama/Qwen/OPT ``layers``,
# BERT/RoBERTa ``layer``, GPT-2 ``h``, T5 ``block``, others ``blocks``. The block index is the integer right
# after the FIRST such component, so a nested list (T5's ``block.3.layer.0``, MoE ``experts.5``) never wins.
BLOCK_LISTS = ("layers", "layer", "h", "blocks", "block")
N_INPUTS = len(SPEC_FIELDS) + 2  # five spec fields, block index, matrix type


def block_index(name: str) -> int:
    """The transformer block a layer belongs to: the integer right after a block-list component.

    ``model.layers.7.self_attn.q_proj`` → 7, ``transformer.h.3.attn.c_attn`` → 3,
    ``model.decoder.layers.2.fc1`` → 2, ``roberta.encoder.layer.5.attention.self.query`` → 5.

    Raises:
        ValueError: no component of ``name`` in :data:`BLOCK_LISTS` is followed by an integer.
    """
    parts = name.split(".")
    for here, after in zip(parts, parts[1:]):
        if here in BLOCK_LISTS and after.isdigit():
            return int(after)
    raise ValueError(f"layer name {name!r} has no block index (an integer after one of {'/'.join(BLOCK_LISTS)})")


def matrix_type(name: str) -> str:
    """The matrix type of a layer: the last component of its name (``q_proj``, ``down_proj``, ``c_attn``)."""
    return name.rsplit(".", 1)[-1]


def vocabulary(names: Iterable[str]) -> tuple[int, list[str]]:
    """θ's vocabularies from the model's quantized layer names.

    Returns:
        (n_blocks, matrix_types): one more than the largest block index, and the matrix types sorted
        (sorted, not first-seen, so the order does not depend on the order the names come in).
    """
    names = list(names)
    if not names:
        raise ValueError("vocabulary: no layer names")
    return max(block_index(n) for n in names) + 1, sorted({matrix_type(n) for n in names})


def spec_field_indices(spec: QuantSpec) -> list[int]:
    """The spec's five fields as indices into their allowed values, in ``SPEC_FIELDS`` order.

    ``QuantSpec(4, 8, "fp32", 64, 256)`` → ``[2, 3, 2, 2, 2]``.
    """
    return [allowed.index(getattr(spec, field)) for field, allowed in SPEC_FIELDS.items()]


def spec_field_tensor(specs: Sequence[QuantSpec]) -> torch.Tensor:
    """(L, 5) int64: :func:`spec_field_indices` of each spec, one row per layer."""
    return torch.tensor([spec_field_indices(s) for s in specs], dtype=torch.int64).view(len(specs), len(SPEC_FIELDS))


class ConfigNet(nn.Module):
    """θ: (spec fields, block index, matrix type) of L layers → U (L, r, r) = I + s·M. See the module doc.

    Args:
        rank: r, the LoRA rank; U is r × r.
        n_blocks: size of the block-index vocabulary (:func:`vocabulary`).
        matrix_types: the matrix-type vocabulary; ``mtype`` indexes into it.
        embed_dim: d, width of each of the seven embeddings (paper: 8).
        hidden: width of the hidden layer (paper: 128).
        init_std: standard deviation of Linear₂'s initial weights (paper: 1e-3).
    """

    def __init__(self, rank: int, n_blocks: int, matrix_types: Sequence[str], embed_dim: int, hidden: int,
                 init_std: float):
        super().__init__()
        if rank < 1 or n_blocks < 1 or not matrix_types:
            raise ValueError(f"ConfigNet: rank ({rank}) and n_blocks ({n_blocks}) must be ≥ 1, "
                             f"matrix_types non-empty")
        self.rank, self.n_blocks, self.matrix_types = rank, n_blocks, list(matrix_types)
        self.init_std = init_std
        self.fields = nn.ModuleDict({f: nn.Embedding(len(allowed), embed_dim) for f, allowed in SPEC_FIELDS.items()})
        self.block = nn.Embedding(n_blocks, embed_dim)
        self.mtype = nn.Embedding(len(self.matrix_types), embed_dim)
        self.norm = nn.LayerNorm(N_INPUTS * embed_dim)
        self.hidden = nn.Linear(N_INPUTS * embed_dim, hidden)
        self.out = nn.Linear(hidden, rank * rank)
        self.scale = nn.Parameter(torch.ones(()))
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Linear₂ ~ N(0, init_std²), zero bias, s = 1: U ≈ I (plain LoRA) at the start."""
        nn.init.normal_(self.out.weight, mean=0.0, std=self.init_std)
        nn.init.zeros_(self.out.bias)
        self.scale.fill_(1.0)

    def type_index(self, names: Iterable[str]) -> torch.Tensor:
        """(L,) int64: each layer's matrix type as an index into ``matrix_types``."""
        lookup = {t: i for i, t in enumerate(self.matrix_types)}
        try:
            return torch.tensor([lookup[matrix_type(n)] for n in names], dtype=torch.int64)
        except KeyError as exc:
            raise ValueError(f"ConfigNet: matrix type {exc.args[0]!r} not in the vocabulary "
                             f"{self.matrix_types}") from None

    def forward(self, spec_fields: torch.Tensor, block: torch.Tensor, mtype: torch.Tensor) -> torch.Tensor:
        """U for L layers at once.

        Args:
            spec_fields: (L, 5) int64, field indices in ``SPEC_FIELDS`` order (:func:`spec_field_tensor`).
            block: (L,) int64 block indices, each < n_blocks.
            mtype: (L,) int64 matrix-type indices into ``matrix_types``.

        Returns:
            (L, r, r) float tensor U = I + s·M, in θ's parameter dtype.
        """
        parts = [emb(spec_fields[:, j]) for j, emb in enumerate(self.fields.values())]  # 5 × (L, d)
        parts += [self.block(block), self.mtype(mtype)]  # 2 × (L, d)
        h = self.norm(torch.cat(parts, dim=-1))  # (L, 7d)
        m = self.out(nn.functional.silu(self.hidden(h)))  # (L, r·r)
        m = m.view(-1, self.rank, self.rank)  # (L, r, r)
        eye = torch.eye(self.rank, dtype=m.dtype, device=m.device)  # (r, r), broadcast over L
        return eye + self.scale * m

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], rank: int, n_blocks: int,
                        matrix_types: Sequence[str], init_std: float = 0.0) -> "ConfigNet":
        """A ConfigNet shaped by a saved ``state_dict()`` (embed_dim and hidden read off the tensors), loaded.

        Raises:
            ValueError: the tensors do not fit ``rank`` / ``n_blocks`` / ``matrix_types`` (a θ trained for
                another model or other LoRA settings), or keys are missing or unexpected.
        """
        try:
            embed_dim = int(sd["block.weight"].shape[1])
            hidden = int(sd["hidden.weight"].shape[0])
        except KeyError as exc:
            raise ValueError(f"ConfigNet state: missing tensor {exc.args[0]!r}") from None
        net = cls(rank, n_blocks, matrix_types, embed_dim, hidden, init_std)
        load_exact(net, sd, "ConfigNet state")
        return net


def load_exact(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(sd)`` that names every missing, unexpected or mis-shaped tensor.

    Raises:
        ValueError: when the keys or shapes differ from the module's.
    """
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} ≠ {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} does not fit: missing {_short(missing)}, unexpected {_short(unexpected)}, "
                         f"shape mismatches {_short(shapes)}")
    module.load_state_dict(dict(sd))


def _short(items: list[str], limit: int = 4) -> str:
    return "[" + ", ".join(items[:limit]) + (f", … ({len(items)} in all)" if len(items) > limit else "") + "]"

