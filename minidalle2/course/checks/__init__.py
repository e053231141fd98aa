"""
Exercise checks. In a notebook, each exercise cell (the student's code between nbgrader's
`### BEGIN SOLUTION` / `### END SOLUTION` markers) is followed by a check cell:

    from minidalle2.checks import vae as checks
    checks.reparameterize(reparameterize)        # ✓ ... or a CheckFailed that says what is wrong

A check calls the student's function on inputs it chooses, compares with the reference
implementation in the library, and either prints one line saying what was verified, or raises
CheckFailed (an AssertionError, so nbgrader's autograder counts it as a failed test) naming the
first thing that is wrong: the shape, the values (with the largest difference), the gradient.
A function that still raises NotImplementedError fails with NotImplementedError and a hint.

One module per chapter (checks/gan.py, checks/autoencoder.py, ...); the helpers are in core.py.
"""

from .core import CheckFailed, call, expect_close, expect_scalar, expect_shape, passed  # noqa: F401
