"""The one exception type for errors a user can cause and fix."""


class AlignError(Exception):
    """A problem with the user's config, data, files or environment.

    The message names the key, file or line at fault and says what to do. The CLI prints
    it without a traceback and exits with status 2.
    """
