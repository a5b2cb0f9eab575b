"""Errors a user can fix. The CLI turns them into a one-line message and exit status 2."""

import errno


class UserError(Exception):
    """Bad input: invalid params, a missing model or dataset, an impossible budget, a corrupt artifact.

    The message names the offending field (e.g. ``train.lr``) and what is allowed.
    """

    exit_code = 2


class ParamsError(UserError):
    """params.yaml (or a profile overlay) does not validate."""


class ArtifactError(UserError):
    """A stage's input artifact is missing, corrupt (digest mismatch) or foreign."""


class OfflineError(UserError):
    """A model or dataset is not available locally and the hub cannot be reached."""


# A folder without permission, a read-only file system, a full disk: the same on every retry, the user's to fix.
FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def file_error(exc: OSError) -> str | None:
    """One line for an OSError a user fixes (``FILE_ERRNOS``), naming the path; None for any other."""
    if exc.errno not in FILE_ERRNOS:
        return None
    path = exc.filename if exc.filename is not None else "a file"
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space"}.get(exc.errno, "make it writable")
    return f"{path}: {exc.strerror}; {hint} (coalora writes under artifacts/ and .coalora/ of the project)"
