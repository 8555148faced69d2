"""The one exception type for mistakes a user can make (bad config, bad data, missing files).

Entry points catch it, print its message as one line and exit with `exit_code`; everything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    exit_code = 2
