"""The errors a user causes and can fix, as opposed to bugs.

The contract: every exception that a user's input can cause (a setting, a file, a config key, a model
name, a missing optional package) derives from ``UserError``, and its message names that input and says
what to do about it. It is raised where the problem is found and caught once, at the edge: each CLI's
``main`` prints ``error: MESSAGE`` to stderr and exits 2, and each tab of the app shows the message.
Nothing else is caught as a user error (not ValueError, OSError or Exception): a bug keeps its traceback.
"""


class UserError(Exception):
    """Something the user gave cannot be used; the message names it and says what to do."""


class PromptTooLong(UserError):
    """The prompt leaves the model no room to answer within its context; the message says how to shorten it."""


class ModelUnavailable(UserError):
    """A model cannot be loaded or reached (not a folder, not in the cache, hub or server unreachable,
    a package it needs not installed); the message says why and what to do."""


class DataError(UserError):
    """Preference data cannot be used as a whole (unreadable source, no known format, too few pairs); the
    message names the source and says what to do."""


class TrainingError(UserError):
    """Training cannot start or cannot go on; the message says what to change."""
