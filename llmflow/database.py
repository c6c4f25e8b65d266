"""The Prefect server's database: SQLite under LLMFLOW_HOME by default, or a PostgreSQL URL
(`llmflow up --database postgresql+asyncpg://user:password@host:5432/prefect`), checked
before the server starts and shown with its password masked.
"""

# The errors below drop their cause on purpose (`from None`): a driver's exception can
# quote the URL with its password, and `--debug` prints causes. Each message names the
# masked URL and the driver's first line instead.

from __future__ import annotations

import asyncio
from pathlib import Path

from llmflow.errors import ConfigError, StackError

POSTGRES = "postgresql+asyncpg"
SQLITE = "sqlite+aiosqlite"


def sqlite_url(path: Path) -> str:
    return f"{SQLITE}:///{path}"


def _parse(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        # Neither make_url's message nor the value is shown: where its password sits in a
        # string that does not parse is anyone's guess.
        raise ConfigError(
            f"--database: the value is not a database URL (expected "
            f"{POSTGRES}://user:password@host:5432/dbname)"
        ) from None


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for logs, `llmflow status` and errors."""
    try:
        return _parse(url).render_as_string(hide_password=True)
    except ConfigError:
        return "(not a database URL)"


def validate(url: str) -> str:
    """Check the form of a --database URL and return it unchanged.

    Prefect's server runs on PostgreSQL through asyncpg, or on SQLite through aiosqlite.

    Raises:
        ConfigError: another scheme, or a PostgreSQL URL without a host or a database name.
    """
    u = _parse(url)
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        raise ConfigError(
            f"--database: {mask(url)}: Prefect's server talks to PostgreSQL through asyncpg; "
            f"write {POSTGRES}://..."
        )
    if u.drivername == SQLITE:
        if not u.database:
            raise ConfigError(f"--database: {mask(url)}: no SQLite file path ({SQLITE}:///path)")
        return url
    if u.drivername != POSTGRES:
        raise ConfigError(
            f"--database: {mask(url)}: unsupported scheme {u.drivername!r} (use "
            f"{POSTGRES}://user:password@host:5432/dbname, or {SQLITE}:///path)"
        )
    if not u.host or not u.database:
        missing = "host" if not u.host else "database name"
        raise ConfigError(
            f"--database: {mask(url)}: no {missing} (expected "
            f"{POSTGRES}://user:password@host:5432/dbname)"
        )
    return url


def check_reachable(url: str, timeout: float = 10.0) -> None:
    """Connect to a PostgreSQL URL once (SQLite: the file's folder must exist or be creatable).

    Raises:
        StackError: one line naming the masked URL and what failed (refused, wrong password,
            no such database, timeout).
    """
    u = _parse(url)
    if u.drivername == SQLITE:
        try:
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StackError(f"--database: {mask(url)}: {exc.strerror or exc}") from None
        return
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(
            host=u.host,
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            database=u.database,
            timeout=timeout,
            **dict(u.query),
        )
        await conn.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), timeout + 2))
    except TimeoutError:
        raise StackError(f"database {mask(url)} did not answer within {timeout:.0f}s") from None
    except Exception as exc:  # noqa: BLE001 - refused, auth, no such database: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if u.password:
            first = first.replace(u.password, "***")
        raise StackError(f"database {mask(url)} is not reachable: {first}") from None
