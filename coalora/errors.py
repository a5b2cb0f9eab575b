"""Errors a user can fix. The CLI turns them into a one-line message and exit status 2."""


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
