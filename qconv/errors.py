"""The one exception type qconv raises for problems a person must act on."""


class QconvError(Exception):
    """A problem with the user's input or environment, with a message meant for people.

    The CLI prints ``str(error)`` on one line and exits non-zero; library callers can catch it.
    """
