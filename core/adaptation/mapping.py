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

from dataclasses import dataclass

import torch

from core.adaptation.tokens import Vocabulary


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

    def averaging_matrix(self) -> torch.Tensor:
        """Sparse A: [V_new, V_old] (float64 COO), row t averages the old rows of t's pieces; empty rows stay 0."""
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for new_id, ids in enumerate(self.pieces):
            for old_id in ids:
                rows.append(new_id)
                cols.append(old_id)
                vals.append(1.0 / len(ids))
        indices = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
        values = torch.tensor(vals, dtype=torch.float64)
        shape = (self.new_size, self.old_size)
        return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True).coalesce()

    def empty_rows(self) -> torch.Tensor:
        return torch.tensor([i for i, ids in enumerate(self.pieces) if not ids], dtype=torch.long)

    def mean_rows(self, old_rows: torch.Tensor) -> torch.Tensor:
        """Â = A · E_old: [V_new, d] in float64; rows with no pieces get the mean of all old rows."""
        old64 = old_rows.detach().to(torch.float64)
        result = torch.sparse.mm(self.averaging_matrix(), old64)
        empty = self.empty_rows()
        if len(empty):
            result[empty] = old64.mean(dim=0)
        return result
