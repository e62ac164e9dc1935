from .common import UserError, first_line  # noqa: F401  (transition shim; removed at the end of the redesign)
