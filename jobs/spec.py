"""The job request (`POST /v1/jobs` body): core's job settings with uploaded file ids instead of paths.

It is stored with the job as submitted (after defaults are filled in) and turned into an `AdaptationSpec` by the
worker once the files are materialised on its disk (`to_adaptation_spec`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

from pydantic import Field, model_validator

from langadapt.core.adaptation.spec import AdaptationSpec, JobSettings


class JobRequest(JobSettings):
    corpus_file: str = Field(min_length=1, max_length=40, description="file id of the target-language corpus")
    eval_file: str | None = Field(
        None, max_length=40, description="file id of held-out target text; default: the corpus's first characters"
    )
    source_eval_file: str | None = Field(None, max_length=40, description="file id of held-out source text")
    max_attempts: int = Field(
        3, ge=1, description="attempts before a system failure is final (worker lost, storage down): retried till then"
    )

    source_heldout_field: ClassVar[str] = "source_eval_file"

    @model_validator(mode="after")
    def _server_side_paths(self) -> JobRequest:
        if self.evaluation.mera_dir is not None:
            raise ValueError("evaluation.mera_dir is set by the server (LANGADAPT_MERA_DIR), not by a job")
        if self.init.cache_dir is not None:
            raise ValueError("init.cache_dir is set by the server (the job's run directory), not by a job")
        return self

    def file_ids(self) -> dict[str, str]:
        """Request field -> file id, for every uploaded file the job reads."""
        fields = {
            "corpus_file": self.corpus_file,
            "eval_file": self.eval_file,
            "source_eval_file": self.source_eval_file,
            "vocab.source_corpus": self.vocab.source_corpus,
            "cpt.source_corpus": self.cpt.source_corpus,
            "calibration.prompt_file": self.calibration.prompt_file,
        }
        return {name: value for name, value in fields.items() if value is not None}

    def fingerprint(self) -> str:
        """sha256 of the request with defaults filled in: what makes two submissions "the same body"."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_adaptation_spec(
        self, *, files: dict[str, str], models: dict[str, str], heldout: str, mera_dir: str | None
    ) -> AdaptationSpec:
        """The core spec, with file ids replaced by the local paths in `files` (request field -> path) and model
        references by the local paths in `models` (reference -> path)."""
        data: dict[str, Any] = self.model_dump(exclude={"corpus_file", "eval_file", "source_eval_file", "max_attempts"})
        data["base_model"] = models[self.base_model]
        if self.instruct_model is not None:
            data["instruct_model"] = models[self.instruct_model]
        data["corpus"] = files["corpus_file"]
        data["heldout"] = heldout
        data["source_heldout"] = files.get("source_eval_file")
        data["evaluation"]["mera_dir"] = mera_dir
        for section, name in (("vocab", "source_corpus"), ("cpt", "source_corpus"), ("calibration", "prompt_file")):
            if f"{section}.{name}" in files:
                data[section][name] = files[f"{section}.{name}"]
        return AdaptationSpec.model_validate(data)
