"""The correspondence between an old and a new vocabulary, shared by initialisation and propagation.

For every new token t:
- if a token with the same `TokenKey` exists in the old vocabulary (same text, or same special-token name),
  t is *overlapping* and maps to that single old id;
- otherwise t's text is tokenised by the old vocabulary (model level, see `Vocabulary.tokenize_bytes`) and t maps
  to that list of old ids (repeats kept). The list is empty for a special token unknown to the old vocabulary and
  for a token whose text is empty.

`mean_rows(E_old)` turns this into the matrix A·E_old with A[t, s] = count(s in pieces(t)) / len(pieces(t)): the
paper's mean initialisation. Rows with an empty tokenisation get the mean of all old rows (a neutral point in the
embedding cloud), which keeps them finite and close to the data without favouring any token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from langadapt.core.adaptation.tokens import Vocabulary


@dataclass(frozen=True)
class VocabMapping:
    old_size: int
    new_size: int
    overlap: dict[int, int]  # new id -> old id of the same token
    pieces: list[list[int]]  # new id -> old ids composing its text ([old id] when overlapping)

    @classmethod
    def build(cls, old: Vocabulary, new: Vocabulary) -> VocabMapping:
        overlap: dict[int, int] = {}
        pieces: list[list[int]] = []
        for new_id, key in enumerate(new.keys):
            old_id = old.id_by_key.get(key) if key is not None else None
            if old_id is not None:
                overlap[new_id] = old_id
                pieces.append([old_id])
            elif key is None or key.kind == "special":
                pieces.append([])
            else:
                pieces.append(old.tokenize_bytes(key.value))
        return cls(old_size=old.size, new_size=new.size, overlap=overlap, pieces=pieces)

    @property
    def new_ids(self) -> list[int]:
        """Ids of new tokens that do not exist in the old vocabulary."""
        return [i for i in range(self.new_size) if i not in self.overlap]

    def overlap_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(new ids, old ids) of the overlapping tokens, as aligned long tensors."""
        pairs = sorted(self.overlap.items())
        new_ids = torch.tensor([n for n, _ in pairs], dtype=torch.long)
        old_ids = torch.tensor([o for _, o in pairs], dtype=torch.long)
        return new_ids, old_ids

    def mean_rows(self, old_rows: torch.Tensor, new_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Â[new_ids] = A[new_ids] · E_old: [n, d] float64 (all rows by default); a row with no pieces gets the
        mean old row.

        A[t, s] = count(s in pieces(t)) / len(pieces(t)). Only the old rows a block refers to are cast to float64,
        so memory stays proportional to the block, not to the vocabulary.
        """
        selected = range(self.new_size) if new_ids is None else new_ids
        rows, cols, vals = [], [], []
        empty = []
        for offset, ids in enumerate(self.pieces[i] for i in selected):
            if not ids:
                empty.append(offset)
                continue
            rows.extend([offset] * len(ids))
            cols.extend(ids)
            vals.extend([1.0 / len(ids)] * len(ids))
        device = old_rows.device
        used, local_cols = torch.unique(torch.tensor(cols, dtype=torch.long), return_inverse=True)
        indices = torch.stack([torch.tensor(rows, dtype=torch.long), local_cols.reshape(-1)])
        matrix = torch.sparse_coo_tensor(
            indices, torch.tensor(vals, dtype=torch.float64), (len(selected), len(used)), check_invariants=True
        ).to(device)
        used = used.to(device)
        result = torch.sparse.mm(matrix.coalesce(), old_rows[used].detach().to(torch.float64))
        if empty:
            result[empty] = old_rows[: self.old_size].detach().to(torch.float64).mean(dim=0)
        return result
