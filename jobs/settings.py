"""Service settings from environment variables (`LANGADAPT_*`) or a `.env` file, validated at start-up.

The defaults are the embedded mode: SQLite, a local artifact folder and a broker in a SQLite file, all under
`home` (`LANGADAPT_HOME`, by default the user's data directory, e.g. `~/.local/share/langadapt`; never the current
folder, so every command finds the same service), so `langadapt serve` runs with no external services. Production
sets the URLs (see docker-compose.yml).
"""

from __future__ import annotations

import os
from functools import cached_property

import platformdirs
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from langadapt.jobs.storage import ArtifactStore, open_store


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LANGADAPT_", env_file=".env", extra="ignore")

    environment: str = Field("dev", description="dev or production; production refuses embedded defaults")
    home: str = Field(
        default_factory=lambda: platformdirs.user_data_dir("langadapt"),
        description="root of the embedded database, broker, artifacts and worker scratch space",
    )
    database_url: str | None = None
    broker_url: str | None = None
    queue_prefix: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_.:-]*$",
        description="prefix of the queue names and broker keys: deployments (or test runs) sharing a broker",
    )
    storage_url: str | None = Field(None, description="s3://bucket[/prefix] or a folder (default home/artifacts)")
    s3_endpoint: str | None = None
    s3_public_endpoint: str | None = Field(None, description="host:port presigned URLs are signed for")
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    work_dir: str | None = Field(None, description="worker scratch space for runs (default home/work)")

    allowed_model_roots: list[str] = Field(default_factory=list, description="folders job model paths may be in")
    model_catalogue: dict[str, str] = Field(
        default_factory=dict, description="extra model names -> path or s3:// URI, besides core's shortcuts"
    )
    mera_dir: str | None = Field(None, description="MERA task files for mc_ruworldtree / mera_arith")

    # The most one job may ask for: a spec beyond any of them is a 422 `limit_exceeded` at submit (jobs/limits.py).
    max_new_tokens: int = Field(256_000, gt=0, description="vocab.new_tokens")
    max_vocab_size: int = Field(512_000, gt=0, description="vocab.vocab_size and vocab.keep_tokens")
    max_seq_len: int = Field(32_768, gt=0, description="cpt.seq_len and calibration.sft.max_len")
    max_batch_size: int = Field(1024, gt=0, description="every batch_size of a spec")
    max_batch_tokens: int = Field(262_144, gt=0, description="tokens of one training micro-batch: batch x length")
    max_steps: int = Field(1_000_000, gt=0, description="cpt.steps")
    max_train_tokens: int = Field(
        20_000_000_000, gt=0, description="CPT token budget: steps x batch_size x grad_accum x seq_len"
    )
    max_lora_r: int = Field(1024, gt=0, description="cpt.lora_r and calibration.sft.lora_r")
    max_calibration_examples: int = Field(1_000_000, gt=0, description="self-calibration plus copy examples")
    max_sft_epochs: int = Field(100, gt=0, description="calibration.sft.epochs")
    max_generation_tokens: int = Field(8192, gt=0, description="calibration.max_new_tokens")
    max_eval_items: int = Field(100_000, gt=0, description="evaluation.limit")
    max_attempts: int = Field(10, ge=1, description="max_attempts: a job's attempts before a system failure is final")

    # What the GPU workers of this deployment own: jobs are planned against it at submit (jobs/planning.py).
    max_gpus: int = Field(8, ge=1, le=8, description="resources.gpus a job may ask for (workers run --gpus K)")
    gpu_memory_gib: float = Field(80.0, gt=0, description="memory of one GPU of the workers, for the training plan")

    max_header_bytes: int = Field(65_536, gt=0, description="request headers, all together (431 beyond)")
    api_db_slots: int = Field(
        32, gt=0, description="requests using the database at once per API process (below the pool and threads)"
    )
    api_db_wait_s: float = Field(30.0, gt=0, description="how long a request waits for a slot before a 503")
    max_event_streams: int = Field(2000, gt=0, description="open event streams per API process")
    max_event_streams_per_team: int = Field(500, gt=0, description="open event streams of one team per API process")

    metrics_token: str | None = Field(None, description="bearer token /metrics requires (job counts are service-wide)")
    max_upload_bytes: int = Field(2 << 30, gt=0)
    max_corpus_chars: int = Field(20_000_000_000, gt=0, description="characters of an uploaded corpus, decompressed")
    max_line_chars: int = Field(10_000_000, gt=0, description="characters of one line (document) of an upload")
    presign_ttl_s: int = Field(900, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0, description="worker heartbeat and cancel-flag poll period")
    heartbeat_timeout_s: float = Field(120.0, gt=0)
    reaper_interval_s: float = Field(30.0, gt=0)
    retry_backoff_s: float = Field(
        30.0, ge=0, description="delay before a system failure's automatic retry; doubles per failure (max 1 h)"
    )
    worker_beat_interval_s: float = Field(
        5.0,
        gt=0,
        description="how often a worker records that it is alive; /readyz wants a GPU worker's beat within 3 intervals",
    )
    artifact_retention_days: float | None = Field(
        None, gt=0, description="delete the stored files of jobs finished longer ago (scores stay); none: keep forever"
    )
    retention_interval_s: float = Field(3600.0, gt=0, description="how often the maintenance worker applies it")
    visibility_timeout_s: int = Field(7 * 24 * 3600, gt=0, description="above the longest job")

    # Dry-run estimates (jobs/estimate.py): the FLOPs model that seeds the throughput table (H100 SXM dense bf16).
    estimate_gpu_tflops: float = Field(989.0, gt=0, description="peak GPU TFLOP/s of the seed throughput model")
    estimate_mfu: float = Field(0.35, gt=0, le=1, description="model FLOPs utilisation of the seed model")
    payoff_timeout_s: float = Field(300.0, gt=0, description="limit of the quick vocabulary build of an estimate")

    dashboard_secret: str | None = Field(
        None, description="signs dashboard session cookies (default: a random key kept in home, per machine)"
    )

    webhooks_allow_private: bool = Field(
        False, description="allow webhook URLs on private / loopback networks (SSRF guard off: tests, closed labs)"
    )
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_backoff_s: float = Field(10.0, gt=0, description="first retry delay; doubles per attempt (max 1 h)")
    webhook_poll_s: float = Field(2.0, gt=0, description="how often the maintenance worker sends due deliveries")

    # Per-team quotas (jobs/quotas.py); a team's row in `team_quotas` overrides each (`langadapt admin quota set`).
    quota_running_jobs: int = Field(
        8, gt=0, description="a team's jobs running at once; more stay queued until one ends (no 429)"
    )
    quota_queued_jobs: int = Field(1000, gt=0, description="a team's queued jobs; a submit beyond is a 429")
    quota_stored_bytes: int = Field(
        2 << 40, gt=0, description="a team's uploads plus its jobs' artifacts; an upload or submit beyond is a 429"
    )
    quota_post_rate: int = Field(
        1200, gt=0, description="POST requests under /v1 per team per rate window (idempotent replays included)"
    )
    quota_rate_window_s: int = Field(60, gt=0, description="length of the fixed window the POST rate is counted in")
    quota_retry_after_s: int = Field(
        30, gt=0, description="Retry-After of a 429 for queued jobs or stored bytes (the rate's: the window's rest)"
    )
    quota_hold_s: float = Field(
        10.0, gt=0, description="how long a job of a team at its running-jobs quota waits before it is sent again"
    )

    @model_validator(mode="after")
    def _production_is_explicit(self) -> Settings:
        if self.environment == "production":
            missing = [name for name in ("database_url", "broker_url", "storage_url") if not getattr(self, name)]
            if missing:
                raise ValueError(f"production needs {', '.join('LANGADAPT_' + m.upper() for m in missing)}")
        return self

    @cached_property
    def home_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.home))

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{os.path.join(self.home_path, 'langadapt.db')}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{os.path.join(self.home_path, 'broker.db')}"

    def queue(self, role: str) -> str:
        """The broker queue of a worker role (`gpu`, `maintenance`)."""
        return self.queue_prefix + role

    @property
    def storage(self) -> str:
        return self.storage_url or os.path.join(self.home_path, "artifacts")

    def open_store(self) -> ArtifactStore:
        return open_store(
            self.storage,
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key,
            secure=self.s3_secure,
            region=self.s3_region,
            public_endpoint=self.s3_public_endpoint,
        )

    @property
    def work(self) -> str:
        return os.path.abspath(self.work_dir or os.path.join(self.home_path, "work"))
