"""Writing a file that holds a secret on this machine: mode 0600 from its creation, atomically.

The file is created beside its target with mode 0600 (never briefly readable by others), synced,
then renamed over the target, so a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_secret_file"]


def write_secret_file(path: Path, content: str) -> None:
    """Replace ``path`` with ``content``, mode 0600, atomically.

    Raises:
        OSError: the directory is not writable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
